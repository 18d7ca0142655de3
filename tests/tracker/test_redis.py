"""Replicas on one redis-server: consistent announces, shared quality, cross-replica feed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.discovery.dht.records import Topic, make_record
from p2pnode.discovery.tracker import PeerQualityReport, TrackerClient, TrackerRefusedError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import APP, client_for, long_poll_woken, start, synced
from tracker import Tracker
from tracker.backend import AnnounceCommit, ReportCommit
from tracker.core import Announce, PeerReport
from tracker.quality import Candidate, PeerQuality, rank_peers, update_quality
from tracker.stats import UNKNOWN_SCORE
from tracker.swarm_redis import RedisSwarm


@pytest.mark.parametrize("mode", ["script", "log"])
async def test_two_replicas_answer_consistently(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
    mode: str,
) -> None:
    # one DIR (the shared registry), one redis (the shared swarm)
    a = make_tracker("shared", redis_url=redis_url, prefix="t1:", redis_mode=mode)
    b = make_tracker("shared", redis_url=redis_url, prefix="t1:", redis_mode=mode)
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        old, new = make_manifest(1), make_manifest(2)
        await ca.publish(APP, "stable", old.encode())

        # a node long-polling replica B hears of a publish made on replica A within a second
        head = await cb.latest(APP, "stable")
        assert head is not None
        got, delay = await long_poll_woken(
            b, cb, lambda: ca.publish(APP, "stable", new.encode()), since=head.seq
        )
        assert got.manifest_id == new.id and delay < 1.0

        nodes = [keys.generate_key() for _ in range(12)]
        for i, k in enumerate(nodes[:10]):
            c = ca if i % 2 else cb
            await c.announce(
                k,
                app=APP,
                manifest_id=new.id,
                port=7000 + i,
                size=10,
                left=i % 3,
                from_peers=5,
                from_cdn=5,
                numwant=0,
            )
        await ca.announce(
            nodes[10], app=APP, manifest_id=old.id, port=7100, size=10, left=0, numwant=0
        )
        me = nodes[11]
        ra = await ca.announce(me, app=APP, manifest_id=new.id, port=7200, numwant=50)
        rb = await cb.announce(me, app=APP, manifest_id=new.id, port=7200, numwant=50)
        ids_a = [(p.node_id, p.port) for p in ra.peers]
        assert ids_a == [(p.node_id, p.port) for p in rb.peers]
        assert len(ids_a) == 11 and ra.peers[-1].manifest == old.id  # partial seed last

        # a report on A changes ranking on B; corrupt reports from 3 nodes flag on both
        target = ra.peers[-2].node_id
        reporters = [keys.generate_key() for _ in range(4)]
        await ca.report(reporters[0], [PeerQualityReport(target, bytes=100 << 20, rate=50_000_000)])
        rb = await cb.announce(me, app=APP, manifest_id=new.id, port=7200, numwant=50)
        assert rb.peers[0].node_id == target
        bad = ra.peers[0].node_id
        for i, r in enumerate(reporters[1:]):
            c = ca if i % 2 else cb
            await c.report(r, [PeerQualityReport(bad, bytes=1 << 20, corrupt=1)])
        for c in (ca, cb):
            res = await c.announce(me, app=APP, manifest_id=new.id, port=7200, numwant=50)
            assert bad not in [p.node_id for p in res.peers]

        await synced(a, b)
        sa = (await ca._http.get(ca.base_url + "/v1/stats")).json()
        sb = (await cb._http.get(cb.base_url + "/v1/stats")).json()
        assert sa["releases"] == sb["releases"] and sa["quality"] == sb["quality"]
        rel = {r["manifest_id"]: r for r in sa["releases"]}[new.id.hex()]
        assert rel["bytes_from_peers"] == 50 and rel["seeders"] + rel["leechers"] == 11
        assert sa["quality"]["flagged"] == [bad.hex()]
        metrics = (await cb._http.get(cb.base_url + "/metrics")).text
        assert "tracker_swarm_seeders{" in metrics and "tracker_peers_flagged 1.0" in metrics
        assert (await cb._http.get(cb.base_url + "/healthz")).json() == {"status": "ok"}
        for c in (ca, cb):
            await c.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_quality_formula_is_the_same_in_both_stores(
    make_tracker: Callable[..., Tracker], redis_url: str, store: str
) -> None:
    """The Lua copy of the score arithmetic matches tracker.quality's."""
    import os
    import time

    from tracker.core import Report

    t = make_tracker(store, redis_url=redis_url if store == "redis" else None, prefix="q:")
    target = os.urandom(20)
    expected = PeerQuality()
    entries = [
        PeerReport(target, 3 << 20, 2_000_000, 1, 0),
        PeerReport(target, 0, 0, 4, 0),
        PeerReport(target, 5 << 20, 500_000, 0, 2),
    ]
    for i, e in enumerate(entries):
        reporter = os.urandom(20)
        r = Report(public_key=b"", node_id=reporter, ts=0, peers=(e,))
        assert await t.swarm.report(ReportCommit(r, time.time(), os.urandom(16), 60))
        update_quality(expected, e, new_corrupt_reporter=e.corrupt > 0)
        got = await t.swarm.quality(target)
        assert got.score == pytest.approx(expected.score), i
        assert (got.failures, got.corrupt, got.corrupt_reporters) == (
            expected.failures,
            expected.corrupt,
            expected.corrupt_reporters,
        )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # node (5: the announcer itself)
            st.booleans(),  # in the requested build's swarm, else another build's
            st.sampled_from(["", "0", "0.25", "0.5", "0.9"]),  # score ("" unknown, "0" flagged)
            st.integers(0, 3),  # left
        ),
        max_size=14,
    ),
    st.integers(0, 8),
)
def test_redis_ranks_as_the_reference_ranking(
    redis_url: str, cands: list[tuple[int, bool, str, int]], want: int
) -> None:
    """The Lua script's ranking (done in Redis, only the answer sent back) orders exactly as
    ``quality.rank_peers`` over the same swarm state."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    swarm = RedisSwarm(redis_url, prefix="p:")
    now = time.time()
    mine, other = bytes(32), bytes([1]) * 32
    members: dict[tuple[int, bool], int] = {}
    scores: dict[int, str] = {}
    for n, own, score, left in cands:
        members[(n, own)] = left
        scores[n] = score
    ids = [bytes([9, i]) * 10 for i in range(6)]

    def ann(n: int, mid: bytes, left: int, numwant: int) -> Announce:
        return Announce(
            public_key=bytes([n]) * 32,
            node_id=ids[n],
            ts=int(now),
            app=APP,
            manifest=mid,
            ip="10.0.0.1",
            port=7000 + n,
            event="update",
            size=10,
            left=left,
            from_peers=0,
            from_cdn=0,
            uploaded=0,
            numwant=numwant,
            records=(),
        )

    for k, ((n, own), left) in enumerate(members.items(), 1):
        a = ann(n, mine if own else other, left, 0)
        swarm.announce_many([AnnounceCommit(a, "10.0.0.1", None, now, 180, bytes([k]) * 16, 60)])
    for n, score in scores.items():
        if score:
            r.hset("p:qs", ids[n].hex(), score)
    me = ann(5, mine, 5, want)
    (got,) = swarm.announce_many([AnnounceCommit(me, "10.0.0.1", None, now, 180, b"m" * 16, 60)])
    assert got is not None
    views = [
        Candidate(
            ids[n],
            mine if own else other,
            left,
            float(scores[n]) if scores[n] else UNKNOWN_SCORE,
            scores[n] == "0",
        )
        for (n, own), left in members.items()
    ]
    expect = rank_peers(views, manifest=mine, exclude=ids[5], limit=want)
    answer = [json.loads(p) for p in got.peers]
    assert [(p["node_id"], p["manifest"]) for p in answer] == [
        (v.node_id.hex(), v.manifest.hex()) for v in expect
    ]
    assert [p["score"] for p in answer] == [round(v.score, 4) for v in expect]
    swarm.close()
    r.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_a_node_that_does_not_serve_is_counted_never_handed_out(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    store: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = make_tracker(store, redis_url=redis_url if store == "redis" else None, prefix="u:")
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
    m = make_manifest(1)
    await c.publish(APP, "stable", m.encode())
    serving, hidden, asker = keys.generate_key(), keys.generate_key(), keys.generate_key()
    await c.announce(serving, app=APP, manifest_id=m.id, port=7001, size=10, left=0, numwant=0)
    # port 0: no records allowed (it has no address to vouch for) ...
    rec = make_record(hidden, Topic.manifest(m.id), "10.0.0.9", 7002, now=time.time(), ttl=600)
    with pytest.raises(TrackerRefusedError) as bad:
        await c.announce(hidden, app=APP, manifest_id=m.id, port=0, records=[rec.encoded])
    assert bad.value.status == 400
    # ... but it gets peers, and its completion and bytes count
    res = await c.announce(
        hidden,
        app=APP,
        manifest_id=m.id,
        port=0,
        event="completed",
        size=10,
        left=0,
        from_cdn=4,
        from_peers=6,
    )
    assert [p.port for p in res.peers] == [7001]
    res = await c.announce(asker, app=APP, manifest_id=m.id, port=7003, size=10, left=10)
    assert [p.port for p in res.peers] == [7001]  # the hidden node is never handed out
    assert res.seeders == 2  # but it is counted
    stats = (await c._http.get("/v1/stats")).json()
    rel = {r["manifest_id"]: r for r in stats["releases"]}[m.id.hex()]
    assert rel["completed"] == 1 and rel["bytes_from_peers"] == 6 and rel["bytes_from_cdn"] == 4
    await c._http.aclose()


@pytest.mark.parametrize("store", ["sqlite", "script", "log"])
async def test_each_nodes_completion_of_a_build_counts_once_on_every_store(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    store: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """A serving node announces ``left = 0`` before its completion report (the demo's watchers
    do): the report still counts. Repeating it, on another replica or after leaving the swarm,
    does not count again."""
    if store == "sqlite":
        a = b = make_tracker("sqlite")
    else:
        a = make_tracker("shared", redis_url=redis_url, prefix="c:", redis_mode=store)
        b = make_tracker("shared", redis_url=redis_url, prefix="c:", redis_mode=store)
    async with trio.open_nursery() as nursery:
        ca = await start(nursery, a)
        cb = ca if b is a else await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        one, two = make_manifest(1), make_manifest(2)
        await ca.publish(APP, "stable", one.encode())
        await ca.publish(APP, "stable", two.encode())
        x, y = keys.generate_key(), keys.generate_key()

        async def completes(c: TrackerClient, k: object, m: bytes) -> None:
            await c.announce(
                k, app=APP, manifest_id=m, port=7000, size=10, left=0, event="completed"
            )  # type: ignore[arg-type]

        for k in (x, y):  # holding build 1 already, then its completion report
            await ca.announce(k, app=APP, manifest_id=one.id, port=7000, size=10, left=0)
            await completes(cb, k, one.id)
        await completes(ca, x, one.id)  # a repair, a restart: the same node again
        await ca.announce(x, app=APP, manifest_id=one.id, port=7000, event="stopped")
        await completes(cb, x, one.id)
        await completes(ca, x, two.id)  # another build is another completion
        await synced(a, b)
        for c in {ca, cb}:
            stats = (await c._http.get(c.base_url + "/v1/stats")).json()
            got = {r["build"]: r for r in stats["releases"]}
            assert (got[1]["completed"], got[2]["completed"]) == (2, 1), got
            assert sum(n for _, n in got[1]["adoption"]) == 2
            metrics = (await c._http.get(c.base_url + "/metrics")).text
            label = f'app="{APP}",manifest="{one.id.hex()}",version="1.1"'
            assert f"tracker_release_completed_total{{{label}}} 2.0" in metrics
        for c in {ca, cb}:
            await c.aclose()
        nursery.cancel_scope.cancel()
