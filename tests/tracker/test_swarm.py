"""The in-memory swarm store: write-behind to SQLite, expiry order, ranking refresh."""

from __future__ import annotations

import os
from pathlib import Path

from tracker.backend import AnnounceCommit, ReportCommit
from tracker.core import Announce, PeerReport, Report
from tracker.swarm import ADOPTION_KEEP_S, RANK_REFRESH, MemorySwarm
from tracker.swarm_log_state import ReplicaState, pack_snapshot, unpack_snapshot
from tracker.swarm_sqlite import SQLiteSwarm


def ann(manifest: bytes, node: bytes, **kw: object) -> Announce:
    fields: dict[str, object] = {
        "public_key": bytes(32),
        "node_id": node,
        "ts": 0,
        "app": "game",
        "manifest": manifest,
        "ip": None,
        "port": 7000,
        "event": "update",
        "size": 100,
        "left": 100,
        "from_peers": 0,
        "from_cdn": 0,
        "uploaded": 0,
        "numwant": 30,
        "records": (),
    }
    fields.update(kw)
    return Announce(**fields)  # type: ignore[arg-type]


def go(s: MemorySwarm, a: Announce, now: float) -> object:
    return s.announce(AnnounceCommit(a, "10.0.0.1", None, now, 180, os.urandom(16), 600))


def test_write_behind_survives_a_restart(tmp_path: Path) -> None:
    now = 1_000_000.0
    mid = os.urandom(32)
    a, b, c = os.urandom(20), os.urandom(20), os.urandom(20)
    s = SQLiteSwarm(tmp_path / "swarm.db", now=now)
    go(s.state, ann(mid, a, left=0, from_peers=70, from_cdn=30, event="completed"), now)
    go(s.state, ann(mid, b, left=50, from_cdn=40), now)
    digest = os.urandom(16)
    report = Report(b"", c, 0, (PeerReport(a, 5 << 20, 2_000_000, 0, 1),))
    assert s.state.report(ReportCommit(report, now, digest, 600))
    s.file.flush()  # what the tracker's background duty does every second
    go(s.state, ann(mid, c, left=10), now + 1)  # written by close()
    s.close()

    s2 = SQLiteSwarm(tmp_path / "swarm.db", now=now + 2)
    stats = s2.state.stats(now + 2)
    [rel] = stats["releases"]
    assert (rel["seeders"], rel["leechers"], rel["completed"]) == (1, 2, 1)
    assert (rel["bytes_from_peers"], rel["bytes_from_cdn"]) == (70, 70)
    assert s2.state.quality(a).corrupt_reporters == 1 and stats["quality"]["peers_scored"] == 1
    # the replay guard is persistent too
    assert not s2.state.report(ReportCommit(report, now + 2, digest, 600))
    # members expire after a restart as before
    assert s2.state.gc(now + 200) == 3 and s2.state.live_members(now + 200) == 0
    s2.file.flush()
    s2.close()
    s3 = SQLiteSwarm(tmp_path / "swarm.db", now=now + 200)
    assert s3.state.live_members(now + 200) == 0
    s3.close()


def test_order_refreshes_within_rank_refresh() -> None:
    """Progress-only changes re-sort within RANK_REFRESH; membership changes at once."""
    s = MemorySwarm()
    now = 1_000_000.0
    mid = os.urandom(32)
    x, y, me = b"\x01" * 20, b"\x02" * 20, b"\x03" * 20
    go(s, ann(mid, x, left=80), now)
    go(s, ann(mid, y, left=20), now)
    first = go(s, ann(mid, me), now)
    assert [b'"node_id":"' + y.hex().encode() in p for p in first.peers] == [True, False]  # type: ignore[attr-defined]
    go(s, ann(mid, x, left=0), now + 0.1)  # x now holds more, but only its progress moved
    soon = s.answer(mid, "game", me, 30, now + 0.2)
    later = s.answer(mid, "game", me, 30, now + 0.2 + RANK_REFRESH)
    assert x.hex().encode() in later.peers[0]
    assert b'"seed":true' in later.peers[0]
    # the lagging order still shows current data
    assert any(b'"seed":true' in p and x.hex().encode() in p for p in soon.peers)
    assert (later.seeders, later.leechers) == (1, 2)


def nodes_in(answer: object) -> list[bytes]:
    import json

    return [bytes.fromhex(json.loads(p)["node_id"]) for p in answer.peers]  # type: ignore[attr-defined]


def test_the_cached_head_of_the_ranking_follows_every_change_at_once() -> None:
    """Answers reuse each swarm's first TOP servable members; whatever changes who may be
    handed out (joining, leaving, port 0, expiry, a flag) shows in the very next answer."""
    s = MemorySwarm()
    now = 1_000_000.0
    mid = os.urandom(32)
    a, b, c, me = (bytes([i]) * 20 for i in (1, 2, 3, 9))
    go(s, ann(mid, a, left=10), now)
    go(s, ann(mid, b, left=20), now + 5)  # expires 5 s after a
    assert nodes_in(s.answer(mid, "game", me, 30, now + 1)) == [a, b]
    assert nodes_in(s.answer(mid, "game", a, 30, now + 1)) == [b]  # never the asker
    assert nodes_in(s.answer(mid, "game", me, 1, now + 1)) == [a]  # numwant bounds it
    go(s, ann(mid, c, left=0), now + 2)  # joins ahead of both (a seed)
    assert nodes_in(s.answer(mid, "game", me, 30, now + 2)) == [c, a, b]
    go(s, ann(mid, c, left=0, port=0), now + 3)  # stops serving: counted, not handed out
    got = s.answer(mid, "game", me, 30, now + 3)
    assert nodes_in(got) == [a, b] and (got.seeders, got.leechers) == (1, 2)
    go(s, ann(mid, c, left=0), now + 4)  # serves again
    assert nodes_in(s.answer(mid, "game", me, 30, now + 4)) == [c, a, b]
    for reporter in (b"\x06" * 20, b"\x07" * 20, b"\x08" * 20):  # three saw corrupt data
        report = Report(b"", reporter, 0, (PeerReport(c, 0, 0, 0, 1),))
        s.report(ReportCommit(report, now + 4, os.urandom(16), 600))
    assert nodes_in(s.answer(mid, "game", me, 30, now + 4)) == [a, b]
    assert nodes_in(s.answer(mid, "game", me, 30, now + 180.5)) == [b]  # a expired
    go(s, ann(mid, b, event="stopped"), now + 181)
    assert nodes_in(s.answer(mid, "game", me, 30, now + 181)) == []


def test_partial_seeds_from_another_build_drop_out_when_they_expire() -> None:
    """Other builds' swarms are not expired by an answer; their cached head ends at the first
    expiry among its members."""
    s = MemorySwarm()
    now = 1_000_000.0
    old, new = os.urandom(32), os.urandom(32)
    d, e, me = b"\x04" * 20, b"\x05" * 20, b"\x09" * 20
    go(s, ann(old, d, left=50), now)
    go(s, ann(old, e, left=60), now + 10)
    go(s, ann(new, me), now + 10)
    assert nodes_in(s.answer(new, "game", me, 30, now + 11)) == [d, e]
    assert nodes_in(s.answer(new, "game", me, 30, now + 181)) == [e]  # d's 180 s are up


def test_answer_fragments_are_the_json_of_each_member() -> None:
    """Fragments are formatted by hand (no json.dumps): they must parse to exactly what the
    API documents, records included, for seeds, leechers and scored peers."""
    import json
    import time

    from p2pnode.discovery.dht.records import Topic, encode_bundle, make_record
    from p2pnode.release import keys

    s = MemorySwarm()
    now = time.time()
    mid = os.urandom(32)
    k = keys.generate_key()
    pk = keys.public_key_bytes(k)
    rec = make_record(k, Topic.manifest(mid), "10.0.0.9", 7002, now=now, ttl=600)
    bundle = encode_bundle([rec])
    a, b, me = keys.node_id_of(pk), b"\x02" * 20, b"\x09" * 20
    a_ann = ann(mid, a, public_key=pk, port=7002, size=3, left=1)
    s.announce(AnnounceCommit(a_ann, "fd00::1", bundle, now, 180, os.urandom(16), 600))
    go(s, ann(mid, b, left=0, size=100), now)
    report = Report(b"", me, 0, (PeerReport(b, 3 << 20, 500_000, 1, 0),))
    s.report(ReportCommit(report, now, os.urandom(16), 600))
    got = [json.loads(p) for p in s.answer(mid, "game", me, 30, now).peers]
    assert got == [
        {
            "node_id": b.hex(),
            "key": keys.format_public_key(bytes(32)),
            "ip": "10.0.0.1",
            "port": 7000,
            "manifest": mid.hex(),
            "seed": True,
            "progress": 1.0,
            "score": round(s.quality(b).score, 4),
        },
        {
            "node_id": a.hex(),
            "key": keys.format_public_key(pk),
            "ip": "fd00::1",
            "port": 7002,
            "manifest": mid.hex(),
            "seed": False,
            "progress": 0.6667,
            "score": 0.5,
            "records": [rec.encoded.hex()],
        },
    ]


def test_a_completion_is_remembered_across_restarts_and_snapshots(tmp_path: Path) -> None:
    """Which nodes completed a build outlives their membership, a restart (swarm.db) and a log
    snapshot; it goes ``ADOPTION_KEEP_S`` after the build's latest completion."""
    now = 1_000_000.0
    mid, a = os.urandom(32), os.urandom(20)
    s = SQLiteSwarm(tmp_path / "swarm.db", now=now)
    go(s.state, ann(mid, a, left=0), now)  # holds it already (a serving node)
    go(s.state, ann(mid, a, left=0, event="completed"), now)
    assert s.state.gc(now + 1000) == 1  # its membership expires
    s.close()

    def completed(state: MemorySwarm, at: float) -> int:
        [rel] = state.stats(at)["releases"]
        return int(rel["completed"])

    s2 = SQLiteSwarm(tmp_path / "swarm.db", now=now + 2000)
    go(s2.state, ann(mid, a, left=0, event="completed"), now + 2000)
    assert completed(s2.state, now + 2000) == 1
    replica = ReplicaState()  # a log replica: restored from its snapshot
    go(replica, ann(mid, a, left=0, event="completed"), now)
    replica = ReplicaState.from_snapshot(unpack_snapshot(pack_snapshot(replica.capture("1-0"))))
    go(replica, ann(mid, a, left=0, event="completed"), now + 1)
    assert completed(replica, now + 1) == 1
    later = now + 2000 + ADOPTION_KEEP_S + 1
    s2.state.gc(later)
    s2.close()
    s3 = SQLiteSwarm(tmp_path / "swarm.db", now=later)
    go(s3.state, ann(mid, a, left=0, event="completed"), later)
    assert completed(s3.state, later) == 2  # forgotten with the adoption curve
    s3.close()
