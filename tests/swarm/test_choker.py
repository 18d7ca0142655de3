"""The choker, sans-IO: upload slots, reciprocation and the optimistic unchoke over time."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from p2pnode.swarm.choker import INTEREST_TIMEOUT, Choker

MiB = 1 << 20


def peer(k: int) -> bytes:
    return bytes([k]) * 20


def unchoked(c: Choker) -> set[bytes]:
    return {n for n in c.peers if c.is_unchoked(n)}


def test_peers_are_unchoked_at_once_while_slots_are_free() -> None:
    c = Choker(slots=2, rng=random.Random(1))
    assert c.interested(peer(1), 0.0) == [(peer(1), True)]
    assert c.interested(peer(2), 0.1) == [(peer(2), True)]
    assert c.interested(peer(3), 0.2) == []  # no slot: choked until a rechoke
    assert c.interested(peer(1), 0.3) == []  # asking again changes nothing
    assert unchoked(c) == {peer(1), peer(2)}


def test_a_leecher_reciprocates_to_the_peers_that_give_it_most() -> None:
    c = Choker(slots=3, rng=random.Random(1))
    for k in range(1, 7):
        c.interested(peer(k), 0.0)
    for t in range(1, 11):  # peers 5 and 6 upload to us; 1..4 give nothing
        c.downloaded(peer(5), 2 * MiB, float(t))
        c.downloaded(peer(6), MiB, float(t))
        for k in range(1, 7):
            c.interested(peer(k), float(t))
    c.tick(10.0)
    chosen = unchoked(c)
    assert len(chosen) == 3
    assert {peer(5), peer(6)} <= chosen  # the two regular slots
    assert c.optimistic in chosen and c.optimistic not in {peer(5), peer(6)}


def test_a_seed_favours_the_fastest_downloaders() -> None:
    c = Choker(slots=2, rng=random.Random(2))
    for k in range(1, 5):
        c.interested(peer(k), 0.0)
    for t in range(1, 10):
        for k in range(1, 5):
            c.interested(peer(k), float(t))
            if c.is_unchoked(peer(k)):
                c.uploaded(peer(k), k * MiB, float(t))
    c.tick(10.0)
    # One regular slot: the fastest of those served so far; the other is optimistic.
    assert peer(2) in unchoked(c)


def test_the_optimistic_slot_rotates_and_favours_new_peers() -> None:
    c = Choker(slots=2, optimistic_interval=30.0, rng=random.Random(3))
    seen: Counter[bytes] = Counter()
    for k in range(1, 6):
        c.interested(peer(k), 0.0)
    c.downloaded(peer(1), MiB, 0.0)  # peer 1 holds the regular slot throughout
    now = 0.0
    for _ in range(60):
        now += 30.0
        for k in range(1, 6):
            c.interested(peer(k), now)
        c.downloaded(peer(1), MiB, now)
        c.tick(now)
        assert peer(1) in unchoked(c) and len(unchoked(c)) == 2
        assert c.optimistic is not None
        seen[c.optimistic] += 1
    assert set(seen) == {peer(2), peer(3), peer(4), peer(5)}  # everyone gets a turn
    # A newcomer is three times as likely as an old peer to be picked.
    young = Choker(slots=2, rng=random.Random(4))
    picks: Counter[bytes] = Counter()
    for _ in range(600):
        young.peers.clear()
        young.interested(peer(1), 0.0)
        young.interested(peer(2), 0.0)
        young.interested(peer(3), 100.0)  # new
        young.interested(peer(4), 0.0)
        for k in (1, 2, 4):
            young.interested(peer(k), 100.0)
        picks[young._pick_optimistic([peer(2), peer(3), peer(4)], 100.0)] += 1
    assert picks[peer(3)] > 2 * picks[peer(2)]


def test_peers_that_stop_asking_lose_their_slot() -> None:
    c = Choker(slots=1, rng=random.Random(5))
    c.interested(peer(1), 0.0)
    c.interested(peer(2), 0.0)
    now = INTEREST_TIMEOUT + 5
    c.interested(peer(2), now)  # only peer 2 still wants something
    changes = c.tick(now)
    assert (peer(1), False) in changes and (peer(2), True) in changes


def test_a_departed_peer_hands_its_slot_on() -> None:
    c = Choker(slots=1, rng=random.Random(6))
    c.interested(peer(1), 0.0)
    c.interested(peer(2), 0.0)
    assert c.gone(peer(1), 1.0) == [(peer(2), True)]
    assert c.gone(peer(9), 1.0) == []


def test_ticks_happen_on_schedule_and_slots_must_exist() -> None:
    c = Choker(slots=4, rechoke_interval=10.0)
    assert c.tick(0.0) == []
    assert c.next_tick() == 10.0
    assert c.tick(5.0) == []
    with pytest.raises(ValueError):
        Choker(slots=0)


def test_memory_of_past_peers_is_bounded() -> None:
    c = Choker(slots=2)
    for k in range(2000):
        c.downloaded(k.to_bytes(20, "big"), 1, float(k))
    assert len(c._down_meters) < 600


def test_a_peer_unchoked_at_once_keeps_its_turn_until_the_rotation() -> None:
    """With one slot, the peer that took the free slot is not swapped out by the first tick
    (that would waste its transfer in flight); the rotation hands the slot on."""
    for seed in range(20):  # whatever the random picks
        c = Choker(slots=1, optimistic_interval=30.0, rng=random.Random(seed))
        assert c.interested(peer(1), 0.0) == [(peer(1), True)]
        assert c.interested(peer(2), 0.1) == []
        assert c.tick(0.2) == [] and unchoked(c) == {peer(1)}
        assert c.next_tick() <= 30.2
        for t in (10.0, 20.0):
            c.interested(peer(1), t)
            c.interested(peer(2), t)
            assert c.tick(t + 0.2) == []
        c.interested(peer(1), 30.0)
        c.interested(peer(2), 30.0)
        assert sorted(c.tick(30.2)) == [(peer(1), False), (peer(2), True)]


def test_a_frugal_seed_uploads_no_chunk_twice_while_another_was_never_uploaded() -> None:
    m, other = b"m" * 32, b"o" * 32
    c = Choker(frugal=True)
    assert not c.frugal_refuses(m, 0, 3)
    c.sent(m, 0, 3)
    assert c.frugal_refuses(m, 0, 3) and not c.frugal_refuses(m, 1, 3)
    assert not c.frugal_refuses(other, 0, 2)  # counted per swarm
    c.sent(m, 1, 3)
    c.sent(m, 2, 3)
    assert not c.frugal_refuses(m, 0, 3)  # every chunk went out once: any may go again
    plain = Choker()
    plain.sent(m, 0, 3)
    assert not plain.frugal_refuses(m, 0, 3)
