"""LAN discovery over multicast on loopback, and its codec against hostile datagrams."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.dht.lan import (
    LANDiscovery,
    LANMessageError,
    encode_answer,
    encode_query,
    parse_answer,
    parse_query,
)
from p2pnode.discovery.dht.records import Topic, make_record
from p2pnode.release import canonical

MID = bytes(range(32))
NOW = time.time()


def key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)


def lan(i: int, port: int) -> LANDiscovery:
    return LANDiscovery(key(i), interface="127.0.0.1", port=port, wait=0.3)


def test_codec_roundtrip_and_rejections() -> None:
    nonce = os.urandom(16)
    keys = [Topic.manifest(MID).dht_key, Topic.app("game").dht_key]
    assert parse_query(encode_query(keys, nonce)) == (keys, nonce)
    for bad in [
        b"",
        b"de",
        canonical.encode({b"k": keys, b"n": nonce, b"q": b"other-protocol"}),
        canonical.encode({b"k": [], b"n": nonce, b"q": b"p2pnode-lan-v1"}),
        canonical.encode({b"k": [b"short"], b"n": nonce, b"q": b"p2pnode-lan-v1"}),
        canonical.encode({b"k": keys * 3, b"n": nonce, b"q": b"p2pnode-lan-v1"}),
        canonical.encode({b"k": keys, b"n": b"x", b"q": b"p2pnode-lan-v1"}),
        b"x" * 300,
    ]:
        with pytest.raises(LANMessageError):
            parse_query(bad)
    good = make_record(key(0), Topic.manifest(MID), "127.0.0.1", 7000, now=NOW, ttl=600)
    other = make_record(key(1), Topic.app("unrelated"), "127.0.0.1", 7001, now=NOW, ttl=600)
    answer = encode_answer(nonce, [good, other])
    recs, dropped = parse_answer(answer, nonce, {Topic.manifest(MID).dht_key}, now=NOW)
    assert recs == [good] and dropped == 1  # a topic we did not ask about is dropped
    with pytest.raises(LANMessageError):
        parse_answer(answer, os.urandom(16), {Topic.manifest(MID).dht_key}, now=NOW)


def test_responder_answers_only_local_sources_and_rate_limits() -> None:
    d = LANDiscovery(key(0))
    d.announce(Topic.manifest(MID), "192.168.1.5", 7000)
    q = encode_query([Topic.manifest(MID).dht_key], os.urandom(16))
    assert d.handle_query(q, "8.8.8.8", NOW) is None  # a spoofed public source: no reflection
    assert d.handle_query(q, "192.168.1.9", NOW) is not None
    assert d.handle_query(b"junk", "192.168.1.9", NOW) is None
    answers = [d.handle_query(q, "10.0.0.2", NOW) for _ in range(100)]
    assert sum(a is not None for a in answers) <= 21
    nobody = encode_query([Topic.manifest(bytes(32)).dht_key], os.urandom(16))
    assert d.handle_query(nobody, "10.0.0.3", NOW) is None


async def test_find_peers_on_the_lan() -> None:
    port = random.Random(os.getpid()).randrange(40000, 60000)
    a, b, c = lan(0, port), lan(1, port), lan(2, port)
    a.announce(Topic.manifest(MID), "127.0.0.1", 7000)
    b.announce(Topic.app("game"), "127.0.0.1", 7001)
    c.announce(Topic.manifest(MID), "127.0.0.1", 7002)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for d in (a, b, c):
                await nursery.start(d.serve)
            found = await c.find_peers(MID, "game")
            assert [(r.port, r.topic.kind) for r in found] == [(7000, b"m"), (7001, b"a")]
            # hostile datagrams at the group change nothing
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1")
            )
            for junk in [b"", b"x" * 2000, b"d1:q14:p2pnode-lan-v1e"]:
                await sock.sendto(junk, ("239.192.80.78", port))
            sock.close()
            assert sorted(r.port for r in await b.find_peers(MID, "game")) == [
                7000,
                7002,
            ]
            nursery.cancel_scope.cancel()
    assert a.dropped >= 2
