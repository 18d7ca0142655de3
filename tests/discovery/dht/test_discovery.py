"""Peer sources and the first-answer race between them."""

from __future__ import annotations

import random
import time
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.dht.discovery import DHTPeerSource, PeerSource, merge_records
from p2pnode.discovery.dht.records import PeerRecord, Topic, make_record
from p2pnode.discovery.race import Address, Discovery, DiscoveryOptions
from p2pnode.errors import TransportError
from tests.support.dht import swarm

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


def discovery(*sources: FakeSource, first_wait: float = 5.0, grace: float = 0.0) -> Discovery:
    d = Discovery(b"me" * 16, DiscoveryOptions(first_wait=first_wait, grace=grace), None, None)
    for source in sources:
        d.add_source(source)
    return d


Found = tuple[list[int], trio.MemoryReceiveChannel[Address], float]


@asynccontextmanager
async def searching(d: Discovery) -> AsyncIterator[Found]:
    """Run ``d.search``: the first peers' ports, the channel of later news, the time it took."""
    send, receive = trio.open_memory_channel[Address](16)
    manifest = types.SimpleNamespace(id=MID, app="game")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        found = await nursery.start(d.search, manifest, send)
        yield [port for _, port in found], receive, trio.current_time() - start
        nursery.cancel_scope.cancel()


async def test_the_first_non_empty_answer_wins_and_late_ones_join_later(
    autojump_clock: trio.abc.Clock,
) -> None:
    fast_empty = FakeSource("lan", 0.1, [])
    tracker = FakeSource("tracker", 0.5, [record(1)])
    dht = FakeSource("dht", 3.0, [record(1), record(2)])
    d = discovery(fast_empty, tracker, dht)
    async with searching(d) as (ports, later, took):
        assert ports == [7001] and d.winner == "tracker"
        assert took == pytest.approx(0.5)
        with trio.fail_after(5):
            assert (await later.receive())[1] == 7002  # the DHT's answer, news only
        assert fast_empty.calls >= 2  # an empty answer is asked again soon while waiting


async def test_an_outage_is_reported_once_and_so_is_the_recovery(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = FakeSource("tracker", 0.1, TransportError("connection refused"))
    d = discovery(tracker, FakeSource("dht", 0.1, [record(2)]))
    async with searching(d):
        await trio.sleep(60)  # several retries
        assert tracker.calls >= 4
        tracker.result = [record(1)]
        await trio.sleep(60)
    err = capsys.readouterr().err
    assert err.count("via tracker is failing: connection refused") == 1
    assert err.count("via tracker works again") == 1


async def test_tracker_down_means_dht_only(autojump_clock: trio.abc.Clock) -> None:
    tracker = FakeSource("tracker", 0.01, TransportError("tracker refused the connection"))
    dht = FakeSource("dht", 1.0, [record(2)])
    d = discovery(tracker, dht)
    async with searching(d) as (ports, _, took):
        assert ports == [7002] and d.winner == "dht" and took == pytest.approx(1.0)
        assert d.errors == {"tracker": "tracker refused the connection"}
        assert d.summary()["sources"]["tracker"]["failures"] >= 1


async def test_empty_dht_means_tracker_only_and_grace_merges(
    autojump_clock: trio.abc.Clock,
) -> None:
    dht = FakeSource("dht", 0.01, [])
    tracker = FakeSource("tracker", 0.2, [record(1)])
    async with searching(discovery(dht, tracker)) as (ports, _, _):
        assert ports == [7001]
    late = FakeSource("dht", 0.3, [record(1), record(3)])
    async with searching(discovery(FakeSource("tracker", 0.2, [record(1)]), late, grace=0.5)) as (
        ports,
        _,
        took,
    ):
        assert sorted(ports) == [7001, 7003] and took == pytest.approx(0.3)  # all heard: no wait
    slow = FakeSource("dht", 5.0, [record(3)])
    async with searching(discovery(FakeSource("tracker", 0.2, [record(1)]), slow, grace=0.5)) as (
        ports,
        _,
        took,
    ):
        assert ports == [7001] and took == pytest.approx(0.7)  # the grace, then go


async def test_nobody_answering_starts_without_peers_after_the_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    d = discovery(
        FakeSource("tracker", 0.1, TransportError("down")),
        FakeSource("dht", 0.2, []),
        FakeSource("lan", 8, [record(4)]),
        first_wait=2.0,
    )
    async with searching(d) as (ports, later, took):
        assert ports == [] and took == pytest.approx(2.0) and d.winner is None
        with trio.fail_after(30):  # the slow source still reaches the swarm later
            assert (await later.receive())[1] == 7004
    empty = discovery()
    async with searching(empty) as (ports, _, took):
        assert ports == [] and took == 0


async def test_own_records_are_left_out(autojump_clock: trio.abc.Clock) -> None:
    me = record(5)
    d = discovery(FakeSource("dht", 0.1, [me, record(6)]))
    d.node_id = me.node_id
    async with searching(d) as (ports, _, _):
        assert ports == [7006]


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
            both = await DHTPeerSource(nodes[0], include_app=False).find_peers(mid, "game")
            assert sorted(r.port for r in both) == [7001, 7005]


async def test_after_the_fetch_only_the_tracker_is_still_asked(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Tracker asks are the node's announces (it must stay listed while it seeds); lookups in
    the DHT are of no use once the fetch has stopped reading."""
    tracker, dht = FakeSource("tracker", 0.1, [record(1)]), FakeSource("dht", 0.1, [record(2)])
    d = discovery(tracker, dht)
    async with searching(d) as (_, later, _):
        await trio.sleep(100)
        assert tracker.calls >= 3 and dht.calls >= 3
        await later.aclose()  # the fetch is over
        await trio.sleep(31)  # the asks in flight end
        t_calls, d_calls = tracker.calls, dht.calls
        await trio.sleep(300)
        assert dht.calls == d_calls and tracker.calls >= t_calls + 8


async def test_when_every_source_knows_nobody_the_install_starts_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A lone node (or the first of a fleet): waiting out first_wait would only delay the CDN."""
    d = discovery(FakeSource("tracker", 0.1, []), FakeSource("dht", 0.3, []), first_wait=5.0)
    async with searching(d) as (ports, _, took):
        assert ports == [] and took == pytest.approx(0.3) and d.winner is None
