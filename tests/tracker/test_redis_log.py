"""``--redis-mode log``: replicas as a replicated state machine over one Redis stream."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from p2pnode.discovery.tracker import ANNOUNCE_DOMAIN, PeerQualityReport, TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP, start, synced
from tracker import Tracker
from tracker.swarm_log import LogSwarm
from tracker.swarm_log_state import ReplicaState, pack_snapshot, unpack_snapshot


def log_of(t: Tracker) -> LogSwarm:
    assert isinstance(t.swarm, LogSwarm)
    return t.swarm


async def stats(c: TrackerClient) -> dict[str, Any]:
    got: dict[str, Any] = (await c._http.get(c.base_url + "/v1/stats")).json()
    return {"releases": got["releases"], "quality": got["quality"]}


async def populate(
    ca: TrackerClient, cb: TrackerClient, mid: bytes, nodes: list[Any], *, first: int = 0
) -> None:
    """Announces (some completing) alternately on two replicas, and a few reports."""
    for i, k in enumerate(nodes):
        await (ca if i % 2 else cb).announce(
            k,
            app=APP,
            manifest_id=mid,
            port=7000 + first + i,
            size=10,
            left=0 if i % 3 == 0 else 4,
            from_peers=3 * (i + 1),
            from_cdn=2,
            event="completed" if i % 3 == 0 else "started",
            numwant=0,
        )
    target = keys.node_id_of(keys.public_key_bytes(nodes[0]))
    await ca.report(keys.generate_key(), [PeerQualityReport(target, bytes=8 << 20, rate=10**6)])
    await cb.report(keys.generate_key(), [PeerQualityReport(target, bytes=1 << 20, corrupt=1)])


async def start_with_a_build(
    nursery: trio.Nursery,
    t: Tracker,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> tuple[TrackerClient, M.SignedManifest]:
    """Serve ``t``, register the app and publish build 1 to ``stable``."""
    c = await start(nursery, t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    m = make_manifest(1)
    await c.publish(APP, "stable", m.encode())
    return c, m


def signed_announce(key: Any, mid: bytes, port: int) -> tuple[bytes, dict[str, str]]:
    """A raw signed announce (body and headers), to send the very same bytes twice."""
    body = json.dumps(
        {
            "key": keys.format_public_key(keys.public_key_bytes(key)),
            "ts": int(time.time()),
            "nonce": os.urandom(8).hex(),
            "app": APP,
            "manifest": mid.hex(),
            "port": port,
        }
    ).encode()
    return body, {"X-P2PNode-Signature": keys.sign(key, ANNOUNCE_DOMAIN, body).hex()}


async def test_a_replay_is_refused_by_the_other_replica(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    a = make_tracker("shared", redis_url=redis_url, prefix="r:", redis_mode="log")
    b = make_tracker("shared", redis_url=redis_url, prefix="r:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        m = make_manifest(1)
        await ca.publish(APP, "stable", m.encode())
        key = keys.generate_key()
        body, headers = signed_announce(key, m.id, 7000)
        async with httpx.AsyncClient() as http:
            first = await http.post(ca.base_url + "/v1/announce", content=body, headers=headers)
            again = await http.post(cb.base_url + "/v1/announce", content=body, headers=headers)
            # both at once: exactly one of them is first in the log
            body2, headers2 = signed_announce(key, m.id, 7001)
            codes: list[int] = []

            async def post(url: str) -> None:
                r = await http.post(url + "/v1/announce", content=body2, headers=headers2)
                codes.append(r.status_code)

            async with trio.open_nursery() as both:
                both.start_soon(post, ca.base_url)
                both.start_soon(post, cb.base_url)
        assert first.status_code == 200
        assert again.status_code == 409 and "replay" in again.json()["message"]
        assert sorted(codes) == [200, 409]
        await synced(a, b)
        sa, sb = await stats(ca), await stats(cb)
        assert sa == sb
        rel = {r["manifest_id"]: r for r in sa["releases"]}[m.id.hex()]
        assert rel["leechers"] + rel["seeders"] == 1
        for c in (ca, cb):
            await c.aclose()
        nursery.cancel_scope.cancel()


async def test_a_replica_started_later_catches_up_from_snapshot_and_log(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    import redis

    a = make_tracker("shared", redis_url=redis_url, prefix="c:", redis_mode="log")
    b = make_tracker("shared", redis_url=redis_url, prefix="c:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        m = make_manifest(1)
        await ca.publish(APP, "stable", m.encode())
        nodes = [keys.generate_key() for _ in range(12)]
        await populate(ca, cb, m.id, nodes[:6])
        assert await log_of(a).snapshot()
        assert not await log_of(b).snapshot()  # one replica per round (the lock)
        await populate(ca, cb, m.id, nodes[6:9], first=6)
        await trio.to_thread.run_sync(
            redis.Redis.from_url(redis_url).delete, "c:log:snaplock"
        )  # the next round
        r = redis.Redis.from_url(redis_url)
        before = r.xlen("c:log")
        assert await log_of(b).snapshot()
        assert r.xlen("c:log") < before  # trimmed to the first snapshot
        await populate(ca, cb, m.id, nodes[9:], first=9)  # after the snapshot: from the log

        c = make_tracker("shared", redis_url=redis_url, prefix="c:", redis_mode="log")
        cc = await start(nursery, c)
        await synced(a, b, c)
        assert await stats(cc) == await stats(ca) == await stats(cb)
        me = keys.generate_key()
        ra = await ca.announce(me, app=APP, manifest_id=m.id, port=7300, numwant=50)
        rc = await cc.announce(me, app=APP, manifest_id=m.id, port=7300, numwant=50)
        assert len(ra.peers) == 12
        assert [p.node_id for p in ra.peers] == [p.node_id for p in rc.peers]
        q = (await cc._http.get(cc.base_url + "/v1/peers/" + ra.peers[0].node_id.hex())).json()
        qa = (await ca._http.get(ca.base_url + "/v1/peers/" + ra.peers[0].node_id.hex())).json()
        assert q == qa

        # a replica that stalled past the trim point reloads from the snapshot
        stale = LogSwarm(redis_url, prefix="c:")
        try:
            stale.applied = "0-1"
            await stale._check_trimmed()
            assert stale.applied == r.get("c:log:snapid").decode()
            # the second snapshot: after nodes[:9] (3 completions, 2 reports on nodes[0])
            assert stale.state.live_members(time.time()) == 9
            (rel,) = stale.state.stats(time.time())["releases"]
            assert rel["completed"] == 3
            first = keys.node_id_of(keys.public_key_bytes(nodes[0]))
            assert stale.state.quality(first) == log_of(a).state.quality(first)
            assert stale.state.quality(first).reports == 2
        finally:
            stale.close()
        r.close()
        for cl in (ca, cb, cc):
            await cl.aclose()
        nursery.cancel_scope.cancel()


async def test_restarting_every_replica_keeps_counters_and_quality(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    m = make_manifest(1)
    nodes = [keys.generate_key() for _ in range(8)]
    target = keys.node_id_of(keys.public_key_bytes(nodes[0])).hex()
    a = make_tracker("shared", redis_url=redis_url, prefix="s:", redis_mode="log")
    b = make_tracker("shared", redis_url=redis_url, prefix="s:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        await ca.publish(APP, "stable", m.encode())
        await populate(ca, cb, m.id, nodes[:5])
        assert await log_of(a).snapshot()
        await populate(ca, cb, m.id, nodes[5:], first=5)
        # an operator clears a peer's record: replicated too
        cleared = await cb._http.delete(
            cb.base_url + "/v1/peers/" + "ab" * 20, headers={"Authorization": "Bearer " + ADMIN}
        )
        assert cleared.json()["cleared"] is False
        await synced(a, b)
        before = await stats(ca)
        quality = (await ca._http.get(ca.base_url + "/v1/peers/" + target)).json()
        for cl in (ca, cb):
            await cl.aclose()
        nursery.cancel_scope.cancel()
    rel = {r["manifest_id"]: r for r in before["releases"]}[m.id.hex()]
    assert rel["completed"] == 3 and rel["seeders"] + rel["leechers"] == 8
    assert quality["reports"] == 2 and quality["corrupt_reporters"] == 1

    a2 = make_tracker("shared", redis_url=redis_url, prefix="s:", redis_mode="log")
    b2 = make_tracker("shared", redis_url=redis_url, prefix="s:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a2), await start(nursery, b2)
        for c in (ca, cb):
            assert await stats(c) == before
            assert (await c._http.get(c.base_url + "/v1/peers/" + target)).json() == quality
        # members survive too: a seed completing again does not count again
        k = nodes[0]
        await ca.announce(
            k, app=APP, manifest_id=m.id, port=7000, size=10, left=0, event="completed"
        )
        await synced(a2, b2)
        after = {r["manifest_id"]: r for r in (await stats(cb))["releases"]}[m.id.hex()]
        assert after["completed"] == 3
        for cl in (ca, cb):
            await cl.aclose()
        nursery.cancel_scope.cancel()


def test_a_snapshot_round_trips() -> None:
    state = ReplicaState().capture("0-0")
    state["seen"] = [(b"d" * 16, 1234.5), (b"e" * 16, 99.25)]
    back = unpack_snapshot(pack_snapshot(state))
    assert back["seen"] == state["seen"] and back["id"] == "0-0"


async def test_a_change_the_log_cannot_take_is_refused_with_503(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    from tests.support.tracker import free_port
    from tracker.resp import TrioRedis

    t = make_tracker("solo", redis_url=redis_url, prefix="d:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        c, m = await start_with_a_build(nursery, t, publisher, make_manifest)
        log = log_of(t)
        healthy, log._tx = log._tx, TrioRedis(f"redis://127.0.0.1:{free_port()}/0")
        with trio.fail_after(5):
            resp = await c._http.post(c.base_url + "/v1/announce", content=b"{}")
            assert resp.status_code == 400  # refused before the log: nothing to commit
            body, headers = signed_announce(keys.generate_key(), m.id, 7000)
            resp = await c._http.post(c.base_url + "/v1/announce", content=body, headers=headers)
        assert resp.status_code == 503 and resp.json()["error"] == "log_unavailable"
        log._tx = healthy
        res = await c.announce(keys.generate_key(), app=APP, manifest_id=m.id, port=7001)
        assert res.seeders + res.leechers == 1  # the refused one never reached the log
        await c.aclose()
        nursery.cancel_scope.cancel()


async def test_a_change_that_does_not_come_back_in_time_is_503_and_applies_later(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
    monkeypatch: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The apply timeout is one sweeper for all waiting requests (no timer per request)."""
    from tests.support.tracker import free_port
    from tracker import swarm_log
    from tracker.resp import TrioRedis

    monkeypatch.setattr(swarm_log, "APPLY_TIMEOUT", 0.3)
    monkeypatch.setattr(swarm_log, "SWEEP_EVERY", 0.05)
    t = make_tracker("solo", redis_url=redis_url, prefix="e:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        c, m = await start_with_a_build(nursery, t, publisher, make_manifest)
        log = log_of(t)
        # the reader loses Redis: its XREAD in flight ends (within READ_BLOCK_MS), the next fails
        healthy, log._rx = log._rx, TrioRedis(f"redis://127.0.0.1:{free_port()}/0")
        with trio.fail_after(5):
            while "tracker log reader:" not in caplog.text:
                await trio.sleep(0.02)
        body, headers = signed_announce(keys.generate_key(), m.id, 7000)
        with trio.fail_after(5):
            resp = await c._http.post(c.base_url + "/v1/announce", content=body, headers=headers)
        assert resp.status_code == 503 and "within 0.3 s" in resp.json()["message"]
        assert not log._waiting  # the sweeper let go of it
        log._rx = healthy  # the reader catches up: the change was in the log all along
        with trio.fail_after(5):
            while log.state.live_members(time.time()) != 1:
                await trio.sleep(0.02)
        await c.aclose()
        nursery.cancel_scope.cancel()


async def test_entries_of_the_previous_all_json_format_are_still_applied(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """Announces are packed binary now (field ``b``); a log written by the previous version
    (field ``e``, one JSON list per change) still replays."""
    import redis

    t = make_tracker("solo", redis_url=redis_url, prefix="f:", redis_mode="log")
    async with trio.open_nursery() as nursery:
        c, m = await start_with_a_build(nursery, t, publisher, make_manifest)
        ours = await c.announce(keys.generate_key(), app=APP, manifest_id=m.id, port=7001)
        assert ours.seeders + ours.leechers == 1
        pk = keys.public_key_bytes(keys.generate_key())
        now = time.time()
        old = [
            "a", now, 180, os.urandom(16).hex(), 600, "10.0.0.9", "", pk.hex(),
            keys.node_id_of(pk).hex(), APP, m.id.hex(), 7002, "completed", 10, 0, 5, 5, 0,
        ]  # fmt: skip
        r = redis.Redis.from_url(redis_url)
        r.xadd("f:log", {"o": "oldreplica:1", "n": 1, "e": json.dumps([old])})
        r.close()
        log = log_of(t)
        with trio.fail_after(5):
            while log.state.live_members(time.time()) != 2:
                await trio.sleep(0.02)
        (rel,) = log.state.stats(time.time())["releases"]
        assert (rel["seeders"], rel["completed"], rel["bytes_from_peers"]) == (
            ours.seeders + 1,
            1,
            5,
        )
        await c.aclose()
        nursery.cancel_scope.cancel()
