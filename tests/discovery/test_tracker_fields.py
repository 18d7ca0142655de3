"""The tracker client sends optional announce fields (the p2pnode version) only to a tracker
that said it takes them: a tracker older than a field refuses unknown fields."""

from __future__ import annotations

import json
import types
from typing import Any, cast

import httpx

from p2pnode import __version__
from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys


def answer(**extra: Any) -> dict[str, Any]:
    return {"interval": 60, "min_interval": 10, "ttl": 180, "node_id": "00" * 20, "ip": "1.2.3.4",
            "seeders": 0, "leechers": 0, "peers": [], **extra}  # fmt: skip


async def test_the_client_version_goes_only_to_a_tracker_that_lists_it() -> None:
    bodies: list[dict[str, Any]] = []
    answers = [answer(), answer(), answer(announce_fields=["client", 7]), answer()]

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=answers[len(bodies) - 1])

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://t")
    client = TrackerClient("http://t", client=http)
    key = keys.generate_key()
    for _ in answers:
        await client.announce(key, app="game", manifest_id=b"\x01" * 32, port=0, numwant=0)
    await http.aclose()
    assert [b.get("client") for b in bodies] == [None, None, None, __version__]


async def test_a_completion_announce_owes_the_version_only_to_a_tracker_that_takes_it() -> None:
    """A one-off install's completion announce is its client's first: it goes without the
    version. To a tracker whose answer lists the field, the node announces once more with it;
    to an older tracker (no list), nothing more is sent, so nothing it refuses."""
    from p2pnode.node.result import InstallResult
    from p2pnode.node.tracking import announce_completed

    for listed, expected in ((True, [None, __version__]), (False, [None])):
        bodies: list[dict[str, Any]] = []

        def handle(
            request: httpx.Request, listed: bool = listed, bodies: list[Any] = bodies
        ) -> httpx.Response:
            bodies.append(json.loads(request.content))
            return httpx.Response(200, json=answer(**({"announce_fields": ["client"]} if listed
                                                      else {})))  # fmt: skip

        http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://t")
        client = TrackerClient("http://t", client=http)
        me = types.SimpleNamespace(key=keys.generate_key())
        m = types.SimpleNamespace(app="game", id=b"\x01" * 32, total_size=100)
        result = cast(InstallResult, types.SimpleNamespace(
            manifest=m, previous_id=None, from_peers=40, from_cdn=60, peers={}))  # fmt: skip
        await announce_completed(client, cast(Any, me), result, None)
        assert not client.owes_client_version
        await http.aclose()
        assert [b.get("client") for b in bodies] == expected, listed
        assert [b["event"] for b in bodies] == ["completed", "update"][: len(expected)]
        assert all((b["from_cdn"], b["left"]) == (60, 0) for b in bodies)  # the same totals


async def test_patch_bytes_by_source_go_only_to_a_tracker_that_lists_them() -> None:
    """An outcome's split of its patch bytes by source is left out until an announce answer
    lists the fields in ``outcome_fields``: the total ``bytes_patches`` always goes."""
    bodies: list[dict[str, Any]] = []
    listed = answer(outcome_fields=["bytes_patches_cdn", "bytes_patches_peers"])

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/announce":
            return httpx.Response(200, json=listed if bodies else answer())
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json={"accepted": True})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://t")
    client = TrackerClient("http://t", client=http)
    key = keys.generate_key()
    outcome = {"app": "game", "manifest": "01" * 32, "to_build": 2, "kind": "update",
               "outcome": "success", "bytes_patches": 9, "bytes_patches_cdn": 5,
               "bytes_patches_peers": 4}  # fmt: skip
    for _ in range(2):
        await client.announce(key, app="game", manifest_id=b"\x01" * 32, port=0, numwant=0)
        await client.report_outcome(key, outcome)
    await http.aclose()
    assert [(b["bytes_patches"], b.get("bytes_patches_cdn")) for b in bodies] == [(9, None), (9, 5)]
