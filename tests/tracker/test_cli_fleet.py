"""``tracker fleet`` and ``tracker outcomes`` against a running tracker: the tables an operator
reads instead of curling the fleet and outcome routes, their ``--json``, and errors that name
the cause and the fix (an unknown app, a node not seen, an unreachable tracker)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import APP, client_for, free_port, start
from tracker import Tracker


def tracker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracker", *args], capture_output=True, text=True, timeout=60
    )


async def test_fleet_and_outcomes_print_tables_and_json(
    make_tracker: Callable[..., Tracker],
    make_manifest: Callable[..., M.SignedManifest],
    publisher: Ed25519PrivateKey,
) -> None:
    t = make_tracker(client_rate=0.0)
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    await c.publish(APP, "stable", one.encode())
    nodes = [keys.generate_key() for _ in range(3)]
    for k in nodes:
        for event in ("completed", "update"):  # the second announce says the client version
            await c.announce(
                k, app=APP, manifest_id=one.id, port=0, event=event, size=1000, left=0, numwant=0
            )
    await c.publish(APP, "stable", two.encode())
    base = {"app": APP, "manifest": two.id.hex(), "to_build": 2, "from_build": 1, "kind": "update"}
    await c.report_outcome(nodes[0], {**base, "outcome": "success", "bytes_cdn": 500,
                                      "duration_ms": 1200})  # fmt: skip
    await c.report_outcome(nodes[1], {**base, "outcome": "failure", "code": "download_failed"})
    first = keys.node_id_of(keys.public_key_bytes(nodes[0])).hex()
    second = keys.node_id_of(keys.public_key_bytes(nodes[1])).hex()
    async with trio.open_nursery() as nursery:
        url = (await start(nursery, t)).base_url
        runs = {
            name: await trio.to_thread.run_sync(lambda a=argv: tracker_cli(*a, "--url", url))
            for name, argv in {
                "fleet": ["fleet", APP],
                "fleet-json": ["fleet", APP, "--json"],
                "node": ["fleet", "node", second],
                "node-json": ["fleet", "node", first, "--json"],
                "outcomes": ["outcomes", APP],
                "all-outcomes-json": ["outcomes", "--json"],
                "no-app": ["fleet", "nope"],
                "no-app-outcomes": ["outcomes", "nope"],
                "no-node": ["fleet", "node", "ab" * 20],
                "bad-node": ["fleet", "node", "xyz"],
            }.items()
        }
        api = (await c._http.get(f"/v1/apps/{APP}/fleet")).json()
        nursery.cancel_scope.cancel()
    await c._http.aclose()
    for name in ("fleet", "fleet-json", "node", "node-json", "outcomes", "all-outcomes-json"):
        assert runs[name].returncode == 0, (name, runs[name].stderr)

    fleet = runs["fleet"].stdout
    assert fleet.startswith(f"{APP}: 3 nodes seen within 3 days"), fleet
    rows = {ln.split()[0]: ln.split() for ln in fleet.splitlines()[2:] if ln[:1].strip()}
    assert rows["2"][:4] == ["2", "1.2", "1", "33%"] and rows["1"][:4] == ["1", "1.1", "2", "67%"]
    assert "client versions: " in fleet and " x 3" in fleet
    got = json.loads(runs["fleet-json"].stdout)

    def still(view: dict[str, Any]) -> list[dict[str, Any]]:  # the curve ends at "now"
        return [{k: v for k, v in b.items() if k != "adoption"} for b in view["builds"]]

    assert still(got) == still(api) and got["nodes"] == 3  # the tracker's answer as is

    node = runs["node"].stdout
    assert node.startswith(f"node {second}"), node
    assert (
        "update failed: download_failed" in node
        and "failed: download_failed" in node
        and "recent outcomes" in node
    )
    assert json.loads(runs["node-json"].stdout)["apps"][0]["build"] == 2

    outcomes = runs["outcomes"].stdout
    (row,) = [ln for ln in outcomes.splitlines() if ln.startswith(APP)]
    assert "50.0% (1)" in row and "download_failed 1" in row and "500 B" in row, outcomes
    (release,) = json.loads(runs["all-outcomes-json"].stdout)["releases"]
    assert (release["build"], release["failure_codes"]) == (2, {"download_failed": 1})

    # errors: one line on stderr, the cause then the fix, and a non-zero exit
    for name in ("no-app", "no-app-outcomes"):
        err = runs[name].stderr
        assert runs[name].returncode != 0 and not runs[name].stdout
        assert "app nope is not registered on the tracker at http://" in err, err
        assert "(fix: check the app's name" in err and "tracker app add" in err
    err = runs["no-node"].stderr
    assert runs["no-node"].returncode != 0 and f"has not seen node {'ab' * 20} lately" in err
    assert "forgets a node 3 days after" in err, err
    assert runs["bad-node"].returncode == 2 and "'xyz' is not a node id" in runs["bad-node"].stderr


def test_an_unreachable_tracker_is_named_with_the_fix() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (
        ["fleet", APP],
        ["outcomes"],
        ["fleet", "node", "ab" * 20],
        ["rollout", APP, "stable", "show", "--token", "t"],  # every verb that takes --url
        ["forecast", "show", APP, "1"],
    ):
        out = tracker_cli(*argv, "--url", url)
        assert out.returncode != 0 and not out.stdout
        assert f"cannot reach the tracker at {url} (ConnectError" in out.stderr, out.stderr
        assert "(fix: start it (`tracker serve`) or fix --url)" in out.stderr
