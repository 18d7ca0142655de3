"""The fetch scheduler, sans-IO: explicit peers, bitfields and times, no sockets."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.swarm.scheduler import (
    CDN,
    CDN_GRACE,
    CDN_MAX_WAIT,
    CDN_MIN_WAIT,
    FRUGAL_RETRY,
    LEECHER_WAIT,
    MAX_COPIES,
    MAX_DEPTH,
    MIN_DEPTH,
    START_DEPTH,
    RateMeter,
    Scheduler,
)

MiB = 1 << 20


def bits(n: int, held: set[int]) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in held:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def full(n: int) -> bytes:
    return bits(n, set(range(n)))


def sched(n: int = 16, size: int = MiB, seed: int = 1) -> Scheduler:
    return Scheduler([size] * n, range(n), rng=random.Random(seed))


def test_rarest_chunks_go_first() -> None:
    s = sched(8)
    s.bitfield("a", full(8))
    s.bitfield("b", bits(8, {0, 1, 2, 3, 4, 5}))
    s.bitfield("c", bits(8, {0, 1, 2, 3}))
    # 6 and 7 are held by "a" alone, 4 and 5 by two peers, the rest by three.
    got = s.next_requests("a", 0.0)
    assert set(got[:2]) == {6, 7} and set(got[2:]) == {4, 5}
    assert set(s.next_requests("b", 0.0)) == {0, 1, 2, 3}


def test_ties_are_broken_at_random_so_leechers_spread() -> None:
    firsts = set()
    for seed in range(20):
        s = sched(32, seed=seed)
        s.bitfield("origin", full(32))
        firsts.add(s.next_requests("origin", 0.0)[0])
    assert len(firsts) > 5


def test_a_chunk_is_claimed_once_until_the_endgame() -> None:
    s = sched(8)
    s.bitfield("a", full(8))
    s.bitfield("b", full(8))
    got_a = s.next_requests("a", 0.0)
    got_b = s.next_requests("b", 0.0)
    assert len(got_a) == len(got_b) == START_DEPTH
    assert not set(got_a) & set(got_b)
    assert s.next_requests("a", 0.0) == []  # pipeline full


def test_pipeline_depth_follows_the_measured_rate() -> None:
    s = sched(200)
    s.bitfield("fast", full(200))
    s.bitfield("slow", full(200))
    assert s.depth("fast", 0.0) == START_DEPTH
    for t in range(1, 31):  # 10 MiB/s and 0.2 MiB/s for 3 s
        now = t / 10
        for peer, nbytes in (("fast", MiB), ("slow", MiB // 50)):
            s.next_requests(peer, now)
            s.received(peer, next(iter(s.peers[peer].inflight)), nbytes, now)
    assert s.depth("slow", 3.0) == MIN_DEPTH
    assert 10 <= s.depth("fast", 3.0) <= 12  # ~10 chunks a second in flight, plus one
    assert s.depth("fast", 3.0) <= MAX_DEPTH


def test_a_departed_peer_gives_its_requests_back() -> None:
    s = sched(4)
    s.bitfield("a", full(4))
    s.bitfield("b", full(4))
    taken = s.next_requests("a", 0.0)
    assert s.next_requests("b", 0.0) == []  # all four claimed by "a"
    assert sorted(s.remove_peer("a")) == sorted(taken)
    assert sorted(s.next_requests("b", 0.0)) == [0, 1, 2, 3]
    assert s.count == [1, 1, 1, 1]


def test_frugal_rejects_defer_and_choked_rejects_do_not_forget_availability() -> None:
    s = sched(1)
    s.bitfield("origin", full(1))
    s.bitfield("peer", full(1))
    (i,) = s.next_requests("origin", 0.0)
    s.rejected("origin", i, b"frugal", 0.0)
    assert s.next_requests("origin", 0.5) == []  # deferred for a second
    assert s.next_requests("peer", 0.5) == [i]  # someone else may have it
    s.rejected("peer", i, b"choked", 0.6)
    assert s.has("peer", i)
    assert s.next_requests("origin", 1.1) == [i]
    s.rejected("origin", i, b"unavailable", 1.2)
    assert not s.has("origin", i) and s.count[i] == 1


def test_a_corrupt_piece_is_asked_of_someone_else() -> None:
    s = sched(1)
    s.bitfield("liar", full(1))
    s.bitfield("honest", full(1))
    (i,) = s.next_requests("liar", 0.0)
    s.failed("liar", i)
    assert s.next_requests("liar", 1.0) == []
    assert s.next_requests("honest", 1.0) == [i]


def test_endgame_duplicates_late_requests_but_never_asks_an_origin() -> None:
    s = sched(4)
    s.bitfield("slow", full(4))
    taken = s.next_requests("slow", 0.0)
    s.bitfield("origin", full(4))
    s.origins.add("origin")
    assert s.next_requests("origin", 100.0) == []  # its upload is spared
    s.bitfield("partial", bits(4, {0, 1, 2}))
    # Not late yet: 4 unmeasured chunks queued are expected to take 8 s, slack 2x.
    assert s.next_requests("partial", 10.0) == []
    dup = s.next_requests("partial", 17.0)
    assert set(dup) <= {0, 1, 2} & set(taken) and dup
    assert all(len(s.holders[i]) <= MAX_COPIES for i in s.holders)
    # The first copy wins; the other request is cancelled.
    i = dup[0]
    assert s.received("partial", i, MiB, 17.5)
    assert s.take_cancels("slow") == {i}
    assert not s.received("slow", i, MiB, 17.6)  # a late duplicate is not new
    # A leecher that finished and stayed (a seed, not an origin) may take a copy.
    s.bitfield("finished", full(4))
    assert s.next_requests("finished", 20.0)


def test_endgame_waits_for_a_measured_holder_to_be_late() -> None:
    s = sched(3)
    s.bitfield("a", full(3))
    s.bitfield("b", bits(3, {0, 1}))
    for t in range(10):  # "a" delivers 1 MiB every 0.1 s for a second
        s._claim("a", s.peers["a"], 2, t / 10)  # (the same chunk, to build a rate)
        s.received("a", 2, MiB, t / 10 + 0.1)
    s.missing |= {2}
    s.done.discard(2)
    taken = s.next_requests("a", 1.0)
    assert sorted(taken) == [0, 1, 2][: len(taken)]
    assert s.next_requests("b", 1.1) == []  # "a" is expected to finish within 0.3 s
    assert s.next_requests("b", 2.0)  # it did not: duplicate


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    holdings=st.lists(st.sets(st.integers(0, 39)), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_every_offered_chunk_is_fetched_exactly_once(
    n: int, holdings: list[set[int]], seed: int
) -> None:
    s = sched(n, seed=seed)
    rng = random.Random(seed)
    peers = [f"p{k}" for k in range(len(holdings))]
    for p, held in zip(peers, holdings, strict=True):
        s.bitfield(p, bits(n, {i for i in held if i < n}))
    offered = {i for held in holdings for i in held if i < n}
    delivered: list[int] = []
    now = 0.0
    for _ in range(10 * n + 10):
        now += 0.5
        p = rng.choice(peers)
        for i in s.next_requests(p, now):
            assert s.has(p, i)
            if s.received(p, i, MiB, now):
                delivered.append(i)
        for q in peers:
            s.take_cancels(q)
    assert sorted(delivered) == sorted(offered)
    assert s.missing == set(range(n)) - offered
    assert s.offered() == bool(s.holders)


def test_rate_meter_windows() -> None:
    m = RateMeter(window=2.0)
    assert m.rate(0.0) == 0.0
    m.start(0.0)
    m.add(1000, 0.5)
    assert m.rate(1.0) == 1000.0  # the window is as young as the transfer
    m.add(1000, 1.0)
    assert m.rate(2.0) == 1000.0
    assert m.rate(5.0) == 0.0  # all samples aged out
    assert m.total == 2000


def test_an_origin_is_asked_only_for_what_the_swarm_lacks() -> None:
    s = sched(6)
    s.bitfield("origin", full(6))
    s.origins.add("origin")
    s.bitfield("a", bits(6, {0, 1, 2}))
    s.bitfield("b", bits(6, {0, 1}))
    # 0 and 1 are held by two other peers: they come from them, never from the origin.
    assert set(s.next_requests("origin", 0.0)) == {2, 3, 4, 5}
    assert set(s.next_requests("a", 0.0)) | set(s.next_requests("b", 0.0)) == {0, 1}


def test_the_cdn_gets_what_no_peer_has_after_the_grace() -> None:
    """A delta: the only peer holds the build before, which shares chunks 0-3."""
    s = sched(8)
    s.enable_cdn(0.0)
    assert s.cdn_requests(0.5, room=8) == []  # bitfields may still be on their way
    s.bitfield("a", bits(8, {0, 1, 2, 3}), earlier_build=True)
    assert s.cdn_requests(CDN_GRACE - 0.1, room=8) == []
    assert s.cdn_requests(CDN_GRACE, room=8) == [4, 5, 6, 7]  # nobody has them
    assert set(s.next_requests("a", CDN_GRACE)) <= {0, 1, 2, 3}  # the peer gets the rest
    assert all(s.count[i] == (1 if i < 4 else 0) for i in range(8))  # the CDN counts for none
    for i in (4, 5, 6, 7):
        assert s.received(CDN, i, MiB, CDN_GRACE + 1)
    assert s.done == {4, 5, 6, 7}


def test_the_cdn_takes_no_more_than_its_room_and_nothing_twice() -> None:
    s = sched(8)
    s.enable_cdn(0.0)
    assert s.cdn_requests(CDN_GRACE, room=3) == [0, 1, 2]
    assert s.inflight(CDN) == 3
    assert s.cdn_requests(CDN_GRACE, room=5) == [3, 4, 5, 6, 7]
    assert s.cdn_requests(CDN_GRACE + 10, room=5) == []


def test_a_chunk_a_peer_held_waits_the_grace_again_after_it_leaves() -> None:
    s = sched(4)
    s.enable_cdn(0.0)
    s.bitfield("a", full(4))
    assert s.cdn_requests(10.0, room=4) == []
    s.remove_peer("a")
    assert s.cdn_requests(10.0 + CDN_GRACE / 2, room=4) == []
    assert s.cdn_requests(10.0 + CDN_GRACE, room=4) == [0, 1, 2, 3]


def test_a_request_past_its_deadline_is_copied_to_the_cdn_and_the_first_copy_wins() -> None:
    s = sched(4)
    s.enable_cdn(0.0)
    s.bitfield("slow", full(4))
    asked = s.next_requests("slow", 0.0)
    assert asked and s.cdn_requests(CDN_MIN_WAIT - 0.1, room=8) == []
    # Unmeasured holder: 2 s expected per queued request, times CDN_SLACK, capped.
    late = s.cdn_requests(CDN_MAX_WAIT + 0.1, room=1)
    assert len(late) == 1 and late[0] in asked
    assert s.received(CDN, late[0], MiB, 30.0)
    assert s.take_cancels("slow") == {late[0]}  # the peer's copy is cancelled
    # And the other way round: the peer first, the CDN's copy is a duplicate.
    other = s.cdn_requests(200.0, room=1)[0]
    assert s.received("slow", other, MiB, 200.5)
    assert not s.received(CDN, other, MiB, 201.0)


def test_a_failed_cdn_gives_its_chunks_back_and_takes_no_more() -> None:
    s = sched(4)
    s.enable_cdn(0.0)
    assert s.cdn_requests(CDN_GRACE, room=2) == [0, 1]
    assert s.disable_cdn() == [0, 1]
    assert s.cdn_requests(CDN_GRACE + 1, room=4) == []
    assert not s.holders and s.missing == {0, 1, 2, 3}
    s.bitfield("a", full(4))
    assert sorted(s.next_requests("a", 10.0)) == [0, 1, 2, 3]


def test_without_the_cdn_nothing_goes_to_it() -> None:
    s = sched(4)
    assert s.cdn_requests(100.0, room=4) == []


def test_a_measured_peer_is_late_for_the_cdn_at_its_slack_not_before_the_minimum() -> None:
    s = sched(4)
    s.enable_cdn(0.0)
    s.bitfield("p", full(4))
    first = s.next_requests("p", 0.0)
    s.received("p", first[0], MiB, 0.1)  # ~10 MiB/s measured
    assert s.cdn_requests(0.1, room=8) == []  # nothing unheld, nothing late
    assert s.cdn_requests(CDN_MIN_WAIT, room=8) == []  # late by its rate, but not 5 s yet
    assert s.cdn_requests(CDN_MIN_WAIT + 0.2, room=8)


def test_chunks_nobody_has_wait_while_connected_leechers_make_progress() -> None:
    """Leechers told only of leechers: nobody holds 2 and 3 yet, but "a" is fetching this
    release too, so neither the CDN nor the end of the swarm phase takes them while chunks
    keep landing; LEECHER_WAIT after the last one, both do."""
    s = sched(4)
    s.enable_cdn(0.0)
    s.bitfield("a", bits(4, {0, 1}))
    assert s.leechers == {"a"}
    s.next_requests("a", 0.0)
    assert s.received("a", 0, MiB, 4.0) and s.received("a", 1, MiB, 4.5)
    assert s.cdn_requests(4.5 + LEECHER_WAIT, room=4) == []
    assert not s.peers_exhausted(4.5 + LEECHER_WAIT, connecting=0)
    later = 4.5 + LEECHER_WAIT + 0.1
    assert s.peers_exhausted(later, connecting=0)
    assert s.cdn_requests(later, room=4) == [2, 3]
    s.remove_peer("a")  # a leecher that left is no longer waited for
    assert not s.leechers


def test_a_seed_or_a_holder_of_an_earlier_build_is_no_leecher() -> None:
    s = sched(4)
    s.bitfield("seed", full(4))
    s.bitfield("old", bits(4, {0}), earlier_build=True)
    assert not s.leechers and not s.waiting_on_leechers(0.0)
    assert not s.peers_exhausted(0.0, connecting=0)  # they still offer chunks
    s.remove_peer("seed")
    s.remove_peer("old")
    assert s.peers_exhausted(0.0, connecting=0)  # at once: no leecher to wait for
    assert not s.peers_exhausted(0.0, connecting=1)  # unless a peer may still show some


def test_next_change_is_when_a_deferral_ends_or_a_request_elsewhere_turns_late() -> None:
    s = sched(4)
    s.bitfield("slow", full(4))
    taken = s.next_requests("slow", 0.0)  # 4 unmeasured: expected 8 s, late past 16 s
    assert s.next_change("slow", 0.0) == math.inf  # nothing more it could be asked for
    s.bitfield("b", bits(4, {0, 1, 2}))
    assert s.next_requests("b", 1.0) == [] and s.next_change("b", 1.0) == 16.0
    assert s.next_requests("b", 16.0) == []  # late at 16 s: not before
    assert s.next_requests("b", 16.001) and taken
    s.bitfield("c", full(4))
    s.rejected("c", taken[0], b"frugal", 20.0)  # (as if it had been asked)
    assert s.next_change("c", 20.0) <= 20.0 + FRUGAL_RETRY
    s.add_origin("o")
    s.bitfield("o", full(4))
    assert s.next_change("o", 20.0) == math.inf  # an origin is never asked for duplicates


def test_the_version_moves_with_every_change_and_only_then() -> None:
    s = sched(4)
    v = s.version
    assert s.next_change("a", 0.0) == math.inf and s.offered() is False and s.version == v
    s.bitfield("a", full(4))
    assert s.version > v
    v = s.version
    (i, *_rest) = s.next_requests("a", 0.0)
    assert s.version > v
    v = s.version
    s.received("a", i, MiB, 1.0)
    assert s.version > v
    v = s.version
    s.remove_peer("a", now=2.0)
    assert s.version > v


def test_next_cdn_change_is_the_grace_the_leecher_wait_or_a_cdn_deadline() -> None:
    s = sched(4)
    assert s.next_cdn_change(0.0) == math.inf  # not a source
    s.enable_cdn(0.0)
    assert s.next_cdn_change(0.0) == CDN_GRACE  # nobody holds anything yet
    s.bitfield("a", bits(4, {0, 1}))  # a leecher: wait for its haves
    s.next_requests("a", 0.0)
    assert s.next_cdn_change(0.1) == min(LEECHER_WAIT, CDN_MAX_WAIT)
    s.remove_peer("a", now=3.0)  # chunks 0 and 1 were held until 3 s
    assert s.next_cdn_change(3.0) == CDN_GRACE  # 2 and 3 never held: grace since 0 s
    assert s.cdn_requests(CDN_GRACE, room=4) == [2, 3]
    assert s.next_cdn_change(CDN_GRACE) == 3.0 + CDN_GRACE
    assert s.cdn_requests(3.0 + CDN_GRACE - 0.01, room=4) == []
    assert s.cdn_requests(3.0 + CDN_GRACE, room=4) == [0, 1]


def test_a_request_misses_its_cdn_deadline_when_next_cdn_change_says() -> None:
    s = sched(4)
    s.enable_cdn(0.0)
    s.bitfield("slow", full(4))
    s.next_requests("slow", 0.0)
    due = s.next_cdn_change(0.0)
    assert due == CDN_MAX_WAIT  # unmeasured: 4 x 2 s x CDN_SLACK, capped
    assert s.cdn_requests(due, room=1) == []
    assert len(s.cdn_requests(due + 0.001, room=1)) == 1


def test_the_swarm_phase_deadline_is_the_stall_or_the_end_of_the_leecher_wait() -> None:
    s = sched(4)
    assert s.phase_deadline(15.0) == 15.0
    s.bitfield("a", bits(4, {0}))
    s.next_requests("a", 0.0)
    s.received("a", 0, MiB, 2.0)
    assert s.phase_deadline(15.0) == 2.0 + LEECHER_WAIT
    assert not s.peers_exhausted(2.0 + LEECHER_WAIT, 0)
    assert s.peers_exhausted(2.0 + LEECHER_WAIT + 0.001, 0)
