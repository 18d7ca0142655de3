"""The serving side's write order (p2pnode/swarm/sendorder.py), on explicit times."""

from __future__ import annotations

import math

import pytest

from p2pnode.swarm.sendorder import MAX_PEERS, MAX_WAIT, TURN_BOUNDS, SendOrder

A, B, C = b"a", b"b", b"c"
MiB = 1 << 20


def test_first_pieces_go_one_at_a_time_oldest_first() -> None:
    order = SendOrder()
    ta, tb, tc = (order.want(p, 0.0, MiB) for p in (A, B, C))
    assert order.grants(0.0) == [ta]
    assert order.grants(0.01) == []  # A's first piece holds the turn
    order.done(ta, 0.09)
    assert order.grants(0.09) == [tb]
    order.done(tb, 0.18)
    assert order.grants(0.18) == [tc]


def test_later_pieces_wait_while_a_first_piece_waits_or_writes() -> None:
    """A's second piece must not share the uplink with B's and C's first."""
    order = SendOrder()
    ta = order.want(A, 0.0, MiB)
    assert order.grants(0.0) == [ta]
    order.done(ta, 0.1)
    a2 = order.want(A, 0.1, MiB)
    tb = order.want(B, 0.1, MiB)
    tc = order.want(C, 0.1, MiB)
    assert order.grants(0.1) == [tb]
    order.done(tb, 0.2)
    assert order.grants(0.2) == [tc]
    order.done(tc, 0.3)
    assert order.grants(0.3) == [a2]


def test_once_everyone_had_a_piece_all_pieces_go_at_once() -> None:
    """The steady state is what it was: the kernel shares the uplink among the writes."""
    order = SendOrder()
    for peer in (A, B, C):
        t = order.want(peer, 0.0, MiB)
        assert order.grants(0.0) == [t]
        order.done(t, 0.0)
    ts = [order.want(p, 1.0, MiB) for p in (A, B, C, A)]
    assert order.grants(1.0) == ts
    assert not order.turn_held


def test_a_later_piece_waiting_too_long_goes_anyway() -> None:
    order = SendOrder(max_wait=MAX_WAIT)
    ta = order.want(A, 0.0, MiB)
    assert order.grants(0.0) == [ta]
    order.done(ta, 0.0)
    a2 = order.want(A, 0.0, MiB)
    tb = order.want(B, 0.0, MiB)
    assert order.grants(0.0) == [tb]  # B's first piece; A's second waits
    assert order.next_change() == pytest.approx(min(MAX_WAIT, order.turn_limit(MiB)))
    # B's receiver is slow: its turn ends at the limit, and A's piece goes then.
    assert order.grants(order.turn_limit(MiB)) == [a2]


def test_a_slow_first_piece_gives_up_its_turn_after_the_limit() -> None:
    """Work-conserving: a receiver that drains slowly does not idle the uplink."""
    order = SendOrder(turn=0.25)
    ta = order.want(A, 0.0, MiB)
    tb = order.want(B, 0.0, MiB)
    assert order.grants(0.0) == [ta]
    assert order.next_change() == pytest.approx(0.25)
    assert order.grants(0.2) == []
    assert order.grants(0.25) == [tb]  # A still writes, without the turn
    order.done(ta, 1.0)  # its late end takes nothing from B
    assert order.turn_held


def test_the_turn_limit_follows_the_rate_of_recent_first_pieces() -> None:
    order = SendOrder(turn=0.25)
    assert order.turn_limit(MiB) == 0.25  # nothing measured yet
    for k in range(8):
        t = order.want(k, float(k), MiB)
        order.grants(float(k))
        order.done(t, k + 0.1)  # 1 MiB in 100 ms: 10 MiB/s
    assert order.turn_limit(MiB) == pytest.approx(0.15)
    # A quarter-size piece gets a quarter of the time (clamped below).
    assert order.turn_limit(MiB // 4) == pytest.approx(max(TURN_BOUNDS[0], 0.0375))
    assert order.turn_limit(4 * MiB) == pytest.approx(0.6)
    for k in range(20):
        t = order.want(100 + k, 100.0 + k, MiB)
        order.grants(100.0 + k)
        order.done(t, 100.0 + k + 10.0)  # very slow receivers: bounded
    assert order.turn_limit(MiB) == TURN_BOUNDS[1]


def test_an_abandoned_wait_leaves_nothing_behind() -> None:
    order = SendOrder()
    ta = order.want(A, 0.0, MiB)
    tb = order.want(B, 0.0, MiB)
    order.done(tb, 0.0)  # its connection closed while waiting
    assert order.grants(0.0) == [ta]
    order.done(ta, 0.1)
    assert order.grants(0.1) == []
    assert order.waiting == 0 and not order.turn_held
    assert order.next_change() == math.inf


def test_peers_are_per_swarm_and_bounded() -> None:
    order = SendOrder()
    t = order.want((A, b"m1"), 0.0, MiB)
    order.grants(0.0)
    order.done(t, 0.0)
    order.want((A, b"m2"), 0.0, MiB)  # the same node in another swarm: a first piece again
    assert order.grants(0.0) and order.turn_held
    for k in range(MAX_PEERS + 100):
        order._served.add(k)
    assert len(order._served) == MAX_PEERS


def test_a_peers_pipelined_requests_are_one_first_piece_and_later_ones() -> None:
    """A leecher asks for several chunks at once; only the oldest is its first piece, the
    rest wait behind the other peers' first pieces."""
    order = SendOrder()
    a1, a2, a3 = (order.want(A, 0.0, MiB) for _ in range(3))
    tb = order.want(B, 0.0, MiB)
    assert order.grants(0.0) == [a1]
    order.done(a1, 0.1)
    assert order.grants(0.1) == [tb]
    order.done(tb, 0.2)
    assert order.grants(0.2) == [a2, a3]
