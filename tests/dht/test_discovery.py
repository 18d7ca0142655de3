"""Peer sources and the first-answer race between them."""

from __future__ import annotations

import random
import time

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.dht.discovery import (
    DHTPeerSource,
    DiscoveryError,
    FirstAnswer,
    PeerSource,
    merge_records,
)
from p2pnode.dht.records import PeerRecord, Topic, make_record
from p2pnode.errors import TransportError

from .helpers import swarm

MID = bytes(range(32))
RNG = random.Random(11)


def record(i: int, topic: Topic | None = None) -> PeerRecord:
    key = Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)
    return make_record(
        key, topic or Topic.manifest(MID), "192.0.2.1", 7000 + i, now=time.time(), ttl=600
    )


class FakeSource:
    def __init__(self, name: str, delay: float, result: list[PeerRecord] | Exception) -> None:
        self.name = name
        self.delay = delay
        self.result = result
        self.cancelled = False
        self.calls = 0

    async def find_peers(self, manifest_id: bytes, app: str) -> list[PeerRecord]:
        self.calls += 1
        try:
            await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled = True
            raise
        if isinstance(self.result, Exception):
            raise self.result
        return list(self.result)


async def test_the_first_non_empty_answer_wins_and_the_rest_are_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    fast_empty = FakeSource("lan", 0.1, [])
    tracker = FakeSource("tracker", 0.5, [record(1)])
    dht = FakeSource("dht", 3.0, [record(2)])
    race = FirstAnswer([fast_empty, tracker, dht])
    start = trio.current_time()
    got = await race.find_peers(MID, "game")
    assert [r.port for r in got] == [7001]
    assert race.last_winner == "tracker"
    assert trio.current_time() - start == pytest.approx(0.5)
    assert dht.cancelled and not tracker.cancelled


async def test_tracker_down_means_dht_only(autojump_clock: trio.abc.Clock) -> None:
    tracker = FakeSource("tracker", 0.01, TransportError("tracker refused the connection"))
    dht = FakeSource("dht", 1.0, [record(2)])
    race = FirstAnswer([tracker, dht])
    assert [r.port for r in await race.find_peers(MID, "game")] == [7002]
    assert race.last_winner == "dht" and "tracker" in race.last_errors


async def test_empty_dht_means_tracker_only_and_grace_merges(
    autojump_clock: trio.abc.Clock,
) -> None:
    dht = FakeSource("dht", 0.01, [])
    tracker = FakeSource("tracker", 0.2, [record(1)])
    assert [r.port for r in await FirstAnswer([dht, tracker]).find_peers(MID, "g")] == [7001]
    late = FakeSource("dht", 0.3, [record(1), record(3)])
    merged = await FirstAnswer([tracker, late], grace=0.5).find_peers(MID, "g")
    assert sorted(r.port for r in merged) == [7001, 7003]


async def test_nobody_and_everybody_failing(autojump_clock: trio.abc.Clock) -> None:
    assert await FirstAnswer([FakeSource("dht", 0.1, [])]).find_peers(MID, "g") == []
    with pytest.raises(DiscoveryError, match="tracker: down"):
        await FirstAnswer(
            [
                FakeSource("tracker", 0.1, TransportError("down")),
                FakeSource("dht", 0.2, TransportError("no nodes")),
            ]
        ).find_peers(MID, "g")
    with pytest.raises(RuntimeError):
        FirstAnswer([])


def test_merge_keeps_one_record_per_node_and_kind() -> None:
    app = Topic.app("game")
    merged = merge_records([record(1), record(2)], [record(1), record(1, app), record(3, app)])
    assert [(r.port, r.topic.kind) for r in merged] == [
        (7001, b"m"),
        (7002, b"m"),
        (7001, b"a"),
        (7003, b"a"),
    ]


async def test_dht_source_finds_seeds_and_partial_seeds() -> None:
    mid = RNG.randbytes(32)
    with trio.fail_after(20):
        async with swarm(8, seed=3) as nodes:
            await nodes[1].announce(Topic.manifest(mid), "127.0.0.1", 7001)
            await nodes[2].announce(Topic.app("game"), "127.0.0.1", 7002)  # holds another build
            await nodes[5].announce(Topic.manifest(mid), "127.0.0.1", 7005)
            source = DHTPeerSource(nodes[5])
            assert isinstance(source, PeerSource)
            got = await source.find_peers(mid, "game")
            assert [(r.port, r.topic.kind) for r in got] == [
                (7001, b"m"),
                (7002, b"a"),
            ]  # not itself
            both = await FirstAnswer([DHTPeerSource(nodes[0], include_app=False)]).find_peers(
                mid, "game"
            )
            assert sorted(r.port for r in both) == [7001, 7005]
