"""The tracker client sends optional announce fields (the p2pnode version) only to a tracker
that said it takes them: a tracker older than a field refuses unknown fields."""

from __future__ import annotations

import json
from typing import Any

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
