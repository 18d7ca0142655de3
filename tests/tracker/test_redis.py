"""Replicas on one redis-server: consistent announces, shared quality, cross-replica feed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from unittest import mock

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pnode import keys
from p2pnode import manifest as M
from p2pnode.tracker_client import PeerQualityReport, TrackerClient
from tracker import Tracker, serve_tracker
from tracker.core import PeerQuality, PeerReport, PeerView, rank_peers, update_quality
from tracker.store import _ranked
from tracker.swarm import UNKNOWN_SCORE

from .conftest import ADMIN, APP


async def start(nursery: trio.Nursery, t: Tracker) -> TrackerClient:
    host, port = await nursery.start(functools.partial(serve_tracker, t, "127.0.0.1", 0))
    return TrackerClient(f"http://{host}:{port}", token=ADMIN)


async def test_two_replicas_answer_consistently(
    make_tracker: Callable[..., Tracker],
    redis_url: str,
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    # one DIR (the shared registry), one redis (the shared swarm)
    a = make_tracker("shared", redis_url=redis_url, prefix="t1:")
    b = make_tracker("shared", redis_url=redis_url, prefix="t1:")
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        old, new = make_manifest(1), make_manifest(2)
        await ca.publish(APP, "stable", old.encode())

        # a node long-polling replica B hears of a publish made on replica A within a second
        head = await cb.latest(APP, "stable")
        assert head is not None
        got: list[float] = []

        async def wait_b() -> None:
            h = await cb.wait_for_release(APP, "stable", since=head.seq)
            assert h.manifest_id == new.id
            got.append(trio.current_time())

        nursery.start_soon(wait_b)
        await trio.sleep(0.3)
        t0 = trio.current_time()
        await ca.publish(APP, "stable", new.encode())
        with trio.fail_after(1.0):
            while not got:
                await trio.sleep(0.01)
        assert got[0] - t0 < 1.0

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
def test_quality_formula_is_the_same_in_both_stores(
    make_tracker: Callable[..., Tracker], redis_url: str, store: str
) -> None:
    """The Lua copy of the score arithmetic matches tracker.core's."""
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
        assert t.swarm.report(r, now=time.time(), digest=os.urandom(16), window=60)
        update_quality(expected, e, new_corrupt_reporter=e.corrupt > 0)
        got = t.swarm.quality(target)
        assert got.score == pytest.approx(expected.score), i
        assert (got.failures, got.corrupt, got.corrupt_reporters) == (
            expected.failures,
            expected.corrupt,
            expected.corrupt_reporters,
        )


@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # node
            st.booleans(),  # of the requested build
            st.sampled_from([b"", b"0", b"0.25", b"0.5", b"0.9"]),  # score ("" = unknown)
            st.integers(0, 3),  # left
        ),
        max_size=30,
    ),
    st.integers(0, 8),
)
def test_redis_ranking_is_the_reference_ranking(
    cands: list[tuple[int, bool, bytes, int]], want: int
) -> None:
    """``store._ranked`` (fragments, no JSON parsing) orders exactly as ``core.rank_peers``."""
    mine, other = bytes(32), bytes([1]) * 32
    me = keys.node_id_of(bytes(32))
    node_ids = [bytes([9, i]) * 10 for i in range(5)] + [me]
    res: list[bytes | int] = [1, 2]
    views = []
    for n, own, score, left in cands:
        node, mid = node_ids[n], mine if own else other
        res += [mid.hex().encode(), node.hex().encode(), b"%d n%d,%d:" % (left, n, own), score]
        s = float(score) if score else UNKNOWN_SCORE
        views.append(PeerView(node, bytes(32), mid, "10.0.0.1", 1, 10, left, s, score == b"0"))
    announce = mock.Mock(manifest=mine, node_id=me, numwant=want)
    got = _ranked(res, announce)
    assert got is not None and (got.seeders, got.leechers) == (1, 2)
    expect = rank_peers(views, manifest=mine, exclude=me, limit=want)
    assert len(got.peers) == len(expect)
    for frag, view in zip(got.peers, expect, strict=True):
        n, own = node_ids.index(view.node_id), view.manifest == mine
        assert frag == b"n%d,%d:" % (n, own) + b"%g}" % round(view.score, 4)
