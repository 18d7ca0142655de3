"""Schema-driven fuzzing of the whole tracker HTTP API (issue 18): schemathesis reads
``/openapi.json`` from a real tracker served by hypercorn on loopback and runs every check
(status codes, content types, response schemas and headers, no 5xx, valid requests accepted and
invalid ones refused, authentication enforced) over every operation, with the admin token.

On each store the tracker runs on: SQLite, Redis (swarm and registry) and PostgreSQL (the
registry, beside the swarm in Redis, as docs/operations.md recommends for replicas). Bounded to
a few examples per operation and a fixed seed, so the suite stays quick and a failure
reproduces; ``bash scripts/apifuzz`` is the long run (more examples, a random seed, every
phase). The tracker is seeded first (an app with a publisher key, two builds, a rollout, an
announce and an outcome) so the fuzzer's requests reach past "not found"."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.apifuzz import fuzz
from tests.support.tracker import ADMIN, APP, STORES
from tracker import Tracker, serve_tracker

HERE = Path(__file__).parent


@pytest.fixture(params=STORES)
def tracker(request: pytest.FixtureRequest, make_tracker: Callable[..., Tracker]) -> Tracker:
    """The tracker the fuzzer probes (and ``client`` seeds), on each store."""
    if request.param == "sqlite":
        return make_tracker()
    redis = str(request.getfixturevalue("redis_url"))
    registry = redis if request.param == "redis" else str(request.getfixturevalue("pg_url"))
    return make_tracker(redis_url=redis, registry_url=registry)


async def seed(http: TrackerClient, make_manifest: Callable[..., M.SignedManifest]) -> None:
    """Data for the fuzzer to find: two builds on stable (the second in a rollout), a node
    that announced the first and reported installing it."""
    one, two = make_manifest(1), make_manifest(2)
    await http.publish(APP, "stable", one.encode())
    await http.publish(APP, "stable", two.encode(), rollout=10)
    node = keys.generate_key()
    await http.announce(node, app=APP, manifest_id=one.id, port=0)
    fields = {"app": APP, "manifest": one.id.hex(), "kind": "install", "outcome": "success"}
    await http.report_outcome(node, {**fields, "to_build": 1})


async def test_the_fuzzer_finds_nothing_wrong_with_the_tracker_api(
    tracker: Tracker,
    client: TrackerClient,
    make_manifest: Callable[..., M.SignedManifest],
    tmp_path: Path,
) -> None:
    await seed(client, make_manifest)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        host, port = await nursery.start(
            functools.partial(serve_tracker, tracker, "127.0.0.1", 0, shutdown=stop)
        )
        url = f"http://{host}:{port}/openapi.json"
        hooks = "tests.support.apifuzz_hooks"
        code, report = await fuzz(url, ADMIN, HERE / "apifuzz.toml", tmp_path, hooks=hooks)
        stop.set()
    print(report)  # shown with -s, and on failure
    assert code == 0, report
