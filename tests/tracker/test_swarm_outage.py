"""The swarm store's Redis goes away and comes back: the tracker answers 503 naming the cause,
keeps running (its background duties included), and serves again once Redis is back."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.tracker import TrackerError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP, RedisProcess, client_for
from tracker.app import Tracker, TrackerConfig
from tracker.stores import open_tracker


@pytest.mark.parametrize("mode", ["script", "log"])
async def test_swarm_redis_outage_is_503_and_the_tracker_survives_it(
    tmp_path: Path,
    own_redis: RedisProcess,
    mode: str,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    skew = [0.0]  # the tracker's clock runs ahead on demand: its 10 s gc ticks come sooner
    config = TrackerConfig(admin_token=ADMIN, clock=lambda: time.time() + skew[0])
    t: Tracker = open_tracker(config, tmp_path / "t", own_redis.url, "o:", mode)
    c = client_for(t)
    node = keys.generate_key()
    b1 = make_manifest(1)

    async def announce() -> None:
        await c.announce(node, app=APP, manifest_id=b1.id, port=7000, size=10, left=5)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)  # the background duties: log, feed, gc, flushes
            await c.add_app(APP, keys.public_key_bytes(publisher))
            await c.publish(APP, "stable", b1.encode())
            await announce()
            own_redis.stop()
            with pytest.raises(TrackerError, match=r"HTTP 503: .*[Rr]edis") as err:
                await announce()
            assert err.value.fix and "redis" in err.value.fix.lower()
            for _ in range(2):  # gc ticks (every 10 s) pass with Redis down
                skew[0] += 11
                await trio.sleep(0.5)
            own_redis.start()
            with trio.fail_after(30):
                while True:
                    try:
                        await announce()
                        break
                    except TrackerError:
                        await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    finally:
        await c._http.aclose()
        t.registry.close()
        t.swarm.close()


async def test_a_failing_swarm_db_write_is_kept_and_written_once_it_can(
    tmp_path: Path,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk fails the write-behind: the tracker keeps serving from memory, says so once,
    and swarm.db catches up (the kept batches written in order) when writing works again."""
    from tracker.swarm_sqlite import SQLiteSwarm

    t: Tracker = open_tracker(TrackerConfig(admin_token=ADMIN), tmp_path / "t", None)
    assert isinstance(t.swarm, SQLiteSwarm)
    c = client_for(t)
    b1 = make_manifest(1)
    nodes = [keys.generate_key() for _ in range(6)]
    real_write, failing = t.swarm.file.write, [True]

    def write(batch: object) -> None:
        if failing[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real_write(batch)  # type: ignore[arg-type]

    t.swarm.file.write = write  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)
            await c.add_app(APP, keys.public_key_bytes(publisher))
            await c.publish(APP, "stable", b1.encode())
            for i, node in enumerate(nodes):
                await c.announce(node, app=APP, manifest_id=b1.id, port=7000 + i, size=10, left=i)
                await trio.sleep(0.4)  # a few flushes fail along the way
            assert "swarm.db failing: writing swarm.db failed: database or disk is full" in (
                caplog.text
            )
            failing[0] = False
            with trio.fail_after(5):  # the next write-behind (every second) catches up
                while "swarm.db works again" not in caplog.text:
                    await trio.sleep(0.05)
            assert caplog.text.count("swarm.db failing") == 1
            nursery.cancel_scope.cancel()
    finally:
        await c._http.aclose()
        t.registry.close()
        t.swarm.close()
    again = SQLiteSwarm(tmp_path / "t" / "swarm.db")
    try:
        (release,) = again.state.stats(time.time())["releases"]
        assert (release["seeders"], release["leechers"]) == (1, 5)
    finally:
        again.close()
