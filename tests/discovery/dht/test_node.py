"""DHT nodes in one process over real loopback UDP: announce/lookup through both bridges,
routing-table persistence, and hostile datagrams."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import socket
import time
from pathlib import Path

import pytest
import trio
import umsgpack

from p2pnode.discovery.dht.node import (
    DHTConfig,
    DHTError,
    DHTStateError,
    load_routing_table,
    open_bridge,
    open_dht_node,
    parse_hostport,
    serve_dht,
)
from p2pnode.discovery.dht.records import Topic, encode_bundle, make_record
from p2pnode.errors import UsageError
from p2pnode.release import canonical
from p2pnode.release.keys import public_key_bytes, sign
from tests.support.dht import cfg, keys, swarm

RNG = random.Random(7)


@pytest.mark.parametrize("bridge_kind", ["thread", "trio-asyncio"])
async def test_announce_and_lookup_multi_value(bridge_kind: str) -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    app = Topic.app("game")
    with trio.fail_after(20):
        async with swarm(12, bridge_kind) as nodes:
            for i in range(3):
                assert await nodes[i].announce(topic, "127.0.0.1", 7000 + i) >= 8
            await nodes[5].announce(app, "127.0.0.1", 7005)
            expected = {public_key_bytes(n.key) for n in nodes[:3]}
            for node in nodes:
                res = await node.lookup_detailed(topic)
                assert {r.public_key for r in res.records} == expected
                assert all(r.topic == topic for r in res.records)
                assert res.queries >= 1 and res.seconds < 2
                assert [r.port for r in await node.lookup(app)] == [7005]
            assert await nodes[0].lookup(Topic.manifest(bytes(32))) == []


async def test_own_fresh_record_wins_over_a_stale_copy() -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    async with swarm(6) as nodes:
        me = nodes[2]
        stale = make_record(me.key, topic, "127.0.0.1", 1111, now=time.time() - 10, ttl=600)
        await me.on_loop(
            me.storage.add_record, topic.dht_key, stale
        )  # what the package's `get` would return
        await me.announce(topic, "127.0.0.1", 2222)
        (mine,) = await me.lookup(topic)
        assert mine.port == 2222
        for other in nodes:
            assert [r.port for r in await other.lookup(topic)] == [2222]
        before = mine.expires
        # A second later on this node's clock (records carry whole seconds), without waiting.
        me.core.config = dataclasses.replace(me.core.config, clock=lambda: time.time() + 1.5)
        assert await me.reannounce() >= 4
        (again,) = await nodes[0].lookup(topic)
        assert again.expires > before


async def test_routing_table_is_saved_as_json_and_used_to_rejoin(tmp_path: Path) -> None:
    state = tmp_path / "dht.json"
    topic = Topic.manifest(RNG.randbytes(32))
    async with open_bridge() as bridge, swarm(6, seed=1) as nodes:
        await nodes[3].announce(topic, "127.0.0.1", 7003)
        key = keys(1, seed=99)[0]
        async with open_dht_node(
            key, cfg(bootstrap=[("127.0.0.1", nodes[0].port)], state_path=state), bridge
        ):
            pass
        doc = json.loads(state.read_text())  # plain JSON, never pickle
        assert doc["format"] == "p2pnode-dht-routing-v1" and len(doc["contacts"]) == 6
        assert {c.port for c in load_routing_table(state)} == {n.port for n in nodes}
        # a restart with no bootstrap list at all rejoins from the saved table
        async with open_dht_node(key, cfg(state_path=state), bridge) as again:
            assert len(await again.contacts()) == 6
            assert [r.port for r in await again.lookup(topic)] == [7003]

        for bad in [
            "{",
            "[]",
            '{"format": "p2pnode-dht-routing-v1", "contacts": [["zz", "x", 1]]}',
        ]:
            state.write_text(bad)
            with pytest.raises(DHTStateError):
                load_routing_table(state)
            async with open_dht_node(key, cfg(state_path=state), bridge) as fresh:
                assert await fresh.contacts() == []  # a broken cache is ignored, not fatal


async def test_port_in_use_and_bad_addresses_are_reported() -> None:
    async with open_bridge() as bridge, open_dht_node(keys(1)[0], cfg(), bridge) as node:
        with pytest.raises(DHTError, match="cannot listen"):
            async with open_dht_node(keys(1, 5)[0], cfg(port=node.port), bridge):
                pass
    assert parse_hostport("192.0.2.1:6881") == ("192.0.2.1", 6881)
    assert parse_hostport("[2001:db8::1]:6881") == ("2001:db8::1", 6881)
    assert parse_hostport("dht.example.org:6881") == ("dht.example.org", 6881)
    for bad in ["192.0.2.1", ":6881", "host:0", "host:70000", "host:x"]:
        with pytest.raises(UsageError):
            parse_hostport(bad)
    with pytest.raises(UsageError):
        DHTConfig(port=70000)


def _request(name: str, *args: object) -> bytes:
    return b"\x00" + RNG.randbytes(20) + umsgpack.packb([name, list(args)])


async def test_hostile_datagrams_change_no_result_and_memory_stays_bounded() -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    key = topic.dht_key
    evil = keys(1, seed=66)[0]
    now = time.time()
    good = make_record(evil, topic, "127.0.0.1", 6666, now=now, ttl=600)
    body = canonical.decode(good.encoded, max_size=512)[b"r"]
    expired_body = {**body, b"e": int(now) - 5}
    expired = canonical.encode(
        {
            b"r": expired_body,
            b"s": sign(evil, b"p2pnode-peer-record-v1", canonical.encode(expired_body)),
        }
    )
    unsigned = canonical.encode({b"r": body, b"s": bytes(64)})
    far_body = {**body, b"e": int(now) + 10 * 86400}
    long_lived = canonical.encode(
        {b"r": far_body, b"s": sign(evil, b"p2pnode-peer-record-v1", canonical.encode(far_body))}
    )
    nid = RNG.randbytes(20)
    hostile = [
        b"",
        b"\x00" * 10,
        b"\x00" + bytes(20) + b"\xc1",  # reserved msgpack byte
        b"\x07" + bytes(20) + umsgpack.packb(["ping", [nid]]),
        _request("save_state", "/tmp/x"),  # not an RPC we serve
        _request("ping"),
        _request("ping", 5),
        _request("ping", b"short"),
        _request("find_node", nid, "key"),
        _request("store", nid, key, 12),
        _request("store", nid, key, b"not a bundle"),
        _request("store", nid, key, encode_bundle([unsigned, expired, long_lived, b"x" * 400])),
        _request("store", nid, key, b"l" + b"5:hello" * 2000 + b"e"),
        b"\x00" + bytes(20) + b"\x91" + b"\x91" * 5000,  # deep nesting
        bytes(30_000),
    ]
    async with swarm(8) as nodes:
        victim = nodes[4]
        await nodes[1].announce(topic, "127.0.0.1", 7001)
        before = await nodes[6].lookup(topic)
        stored_before = await victim.on_loop(len, victim.storage)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        for dgram in hostile:
            await sock.sendto(dgram, ("127.0.0.1", victim.port))
        # a flood of pings from one address: the rate limiter drops most of it
        flood = [_request("ping", nid) for _ in range(3000)]
        for dgram in flood:
            with contextlib.suppress(BlockingIOError):
                await sock.sendto(dgram, ("127.0.0.1", victim.port))
        await trio.sleep(0.3)
        proto = victim.protocol
        assert proto.requests_dropped >= len(hostile) - 2
        assert proto.requests_handled < 1500  # the burst allowance, not the flood
        assert len(proto._limiter._buckets) <= 4096
        assert (
            await victim.on_loop(len, victim.storage) == stored_before
        )  # nothing hostile was stored
        after = await nodes[6].lookup(topic)
        assert [r.encoded for r in after] == [r.encoded for r in before]
        assert [r.port for r in await victim.lookup(topic)] == [7001]
        # and the victim still answers honest peers
        assert len(await nodes[7].lookup(topic)) == 1
        sock.close()


async def test_serve_dht_reannounces_refreshes_and_saves(tmp_path: Path) -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    state = tmp_path / "rt.json"
    async with open_bridge() as bridge, swarm(5, seed=4) as nodes:
        config = cfg(
            bootstrap=[("127.0.0.1", nodes[0].port)],
            state_path=state,
            record_ttl=30,
            reannounce_interval=0.4,
            refresh_interval=0.3,
            save_interval=0.3,
        )
        async with trio.open_nursery() as nursery:
            node = await nursery.start(serve_dht, keys(1, seed=42)[0], config, bridge)
            await node.announce(topic, "127.0.0.1", 7100)
            (first,) = await nodes[1].lookup(topic)
            # Wait for what serve_dht does on its own: a re-signed record and a saved table.
            with trio.fail_after(10):
                while True:
                    (later,) = await nodes[1].lookup(topic)
                    saved = state.exists() and len(load_routing_table(state)) == 5
                    if later.expires > first.expires and saved:
                        break
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


async def test_records_are_handed_to_newly_joined_close_nodes() -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    async with open_bridge() as bridge, swarm(4, seed=8) as nodes:
        await nodes[2].announce(topic, "127.0.0.1", 7002)
        for n in nodes:
            assert len(await n.on_loop(n.storage.records, topic.dht_key)) == 1
        config = cfg(bootstrap=[("127.0.0.1", n.port) for n in nodes])
        async with open_dht_node(keys(1, seed=77)[0], config, bridge) as newcomer:
            with trio.fail_after(3):
                while not await newcomer.on_loop(newcomer.storage.records, topic.dht_key):
                    await trio.sleep(0.02)
            (rec,) = await newcomer.on_loop(newcomer.storage.records, topic.dht_key)
            assert rec.port == 7002


async def _hostile_responder(sock: trio.socket.SocketType, topic: Topic, junk: list[bytes]) -> None:
    """Answer every RPC like a DHT node that lies: forged records and a flood of contacts."""
    rng = random.Random(5)
    liar = keys(1, seed=13)[0]
    now = time.time()
    forged = make_record(liar, topic, "127.0.0.1", 6666, now=now, ttl=600)
    tampered = forged.encoded.replace(b"6666", b"6667")
    wrong_topic = make_record(liar, Topic.app("elsewhere"), "127.0.0.1", 6668, now=now, ttl=600)
    bundle = encode_bundle([tampered, wrong_topic.encoded, *junk])
    contacts = [[rng.randbytes(20), "127.0.0.1", rng.randrange(1024, 65535)] for _ in range(300)]
    while True:
        data, addr = await sock.recvfrom(65536)
        if data[:1] != b"\x00":
            continue
        name, _args = umsgpack.unpackb(data[21:])
        if name == "find_value":
            answer: object = {"nodes": contacts, "values": bundle}
        elif name == "find_node":
            answer = contacts
        else:
            answer = rng.randbytes(20)
        await sock.sendto(b"\x01" + data[1:21] + umsgpack.packb(answer), addr)


async def test_lying_nodes_change_no_lookup_result() -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    junk = [b"garbage", bytes(300), canonical.encode({b"r": {}, b"s": bytes(64)})]
    async with swarm(6, seed=9) as nodes, trio.open_nursery() as nursery:
        await nodes[3].announce(topic, "127.0.0.1", 7003)
        honest = await nodes[0].lookup(topic)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        nursery.start_soon(_hostile_responder, sock, topic, junk)
        # introduce the liar to every honest node (it pings them with a made-up id)
        for node in nodes:
            await sock.sendto(_request("ping", RNG.randbytes(20)), ("127.0.0.1", node.port))
        await trio.sleep(0.1)
        for node in nodes:
            # Each lookup is bounded on its own: a liar may cost stalls, never a hang. (One
            # deadline for all six flaked under a loaded CI machine.)
            with trio.fail_after(5):
                res = await node.lookup_detailed(topic)
            assert [r.encoded for r in res.records] == [r.encoded for r in honest]
            assert res.rejected >= 1
        nursery.cancel_scope.cancel()
        sock.close()


@pytest.mark.parametrize("bridge_kind", ["thread", "trio-asyncio"])
async def test_cancelled_lookups_leave_the_node_usable(bridge_kind: str) -> None:
    topic = Topic.manifest(RNG.randbytes(32))
    async with swarm(6, bridge_kind, seed=10) as nodes:
        await nodes[1].announce(topic, "127.0.0.1", 7001)
        for delay in (0, 0.0005, 0.002, 0.005):
            with trio.move_on_after(delay):
                await nodes[4].lookup(topic)
        with trio.fail_after(3):
            assert [r.port for r in await nodes[4].lookup(topic)] == [7001]
