"""RecordStorage: multi-value merging, verification, expiry and memory bounds."""

from __future__ import annotations

import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.dht.records import PeerRecord, Topic, encode_bundle, make_record
from p2pnode.discovery.dht.storage import RecordStorage
from p2pnode.release import canonical

T0 = 1_800_000_000.0
RNG = random.Random(1)
KEYS = [Ed25519PrivateKey.from_private_bytes(RNG.randbytes(32)) for _ in range(8)]
TOPIC = Topic.manifest(bytes(32))
KEY = TOPIC.dht_key


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def rec(
    i: int, *, topic: Topic = TOPIC, ttl: float = 600, at: float = T0, port: int = 7000
) -> PeerRecord:
    return make_record(KEYS[i], topic, "192.0.2.1", port, now=at, ttl=ttl)


def test_second_announcer_does_not_overwrite_the_first() -> None:
    s = RecordStorage(clock=Clock())
    s[KEY] = encode_bundle([rec(0)])
    s[KEY] = encode_bundle([rec(1)])
    assert {r.public_key for r in s.records(KEY)} == {rec(0).public_key, rec(1).public_key}
    assert len(s) == 2 and s.key_count == 1
    assert s.add_bundle(KEY, s[KEY]) == 2  # replicas are recognised without re-verifying


def test_newer_record_of_the_same_node_replaces_the_older() -> None:
    s = RecordStorage(clock=Clock())
    s[KEY] = encode_bundle([rec(0, ttl=600, port=1)])
    s[KEY] = encode_bundle([rec(0, ttl=900, port=2)])
    s[KEY] = encode_bundle([rec(0, ttl=300, port=3)])  # older: ignored
    (only,) = s.records(KEY)
    assert only.port == 2 and len(s) == 1


def test_records_expire() -> None:
    clock = Clock()
    s = RecordStorage(clock=clock)
    s[KEY] = encode_bundle([rec(0, ttl=100), rec(1, ttl=200)])
    clock.now += 150
    assert [r.public_key for r in s.records(KEY)] == [rec(1).public_key]
    clock.now += 100
    assert s.get(KEY) is None and len(s) == 0 and s.key_count == 0
    assert s.add_bundle(KEY, encode_bundle([rec(2, ttl=100)])) == 0  # arrives expired


def test_only_well_formed_signed_records_for_the_right_key_are_kept() -> None:
    s = RecordStorage(clock=Clock())
    good = rec(0)
    wrong_key = rec(1, topic=Topic.app("other"))
    tampered = good.encoded.replace(b"192.0.2.1", b"192.0.2.9")
    unsigned = canonical.encode(
        {b"r": canonical.decode(good.encoded, max_size=512)[b"r"], b"s": bytes(64)}
    )
    bundle = canonical.encode(
        [b"garbage", tampered, unsigned, wrong_key.encoded, b"x" * 600, good.encoded]
    )
    assert s.add_bundle(KEY, bundle) == 1
    assert s.records(KEY) == [good]
    assert s.rejected == 5
    for value in [b"not bencode", 12, "text", canonical.encode([b"a"] * 33), b"x" * 9000]:
        s[KEY] = value
    assert s.records(KEY) == [good]


def test_bounds_per_key_and_total_under_a_flood() -> None:
    clock = Clock()
    s = RecordStorage(max_per_key=4, max_records=50, clock=clock)
    flood_rng = random.Random(2)
    for i in range(300):
        key = Ed25519PrivateKey.from_private_bytes(flood_rng.randbytes(32))
        topic = Topic.manifest(bytes([i % 20]) * 32)
        r = make_record(key, topic, "192.0.2.1", 7000, now=T0, ttl=60 + i)
        s.add_bundle(topic.dht_key, encode_bundle([r]))
    assert len(s) <= 50
    assert all(len(s.records(Topic.manifest(bytes([j]) * 32).dht_key)) <= 4 for j in range(20))
    assert len(s._heap) <= 2 * 50 + 64
    # the records kept are the longest-lived ones: a flood displaces only what it outlives
    assert min(r.expires for k in list(s._data) for r in s.records(k)) >= T0 + 60 + 300 - 80
    clock.now += 10_000
    assert len(s) == 0 and s.key_count == 0


def test_get_samples_big_keys_and_iterates_for_replication() -> None:
    s = RecordStorage(clock=Clock(), rng=random.Random(3))
    many = [
        make_record(
            Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32),
            TOPIC,
            "192.0.2.1",
            7000,
            now=T0,
            ttl=600,
        )
        for i in range(40)
    ]
    for r in many:
        s.add_record(KEY, r)
    assert len(canonical.decode(s[KEY], max_size=8000)) == 32
    assert [k for k, _ in s] == [KEY]
    assert s.iter_older_than(0) != [] and s.iter_older_than(10) == []


def test_one_network_holds_only_a_few_places_of_a_key() -> None:
    """Keys are free, addresses are not: 40 keys claiming addresses in one /24 get 8 places
    (the longest-lived), while other networks and site-local addresses are not limited."""
    rng = random.Random(5)
    sybils = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(40)]
    s = RecordStorage(clock=Clock(), max_per_network=8)
    for i, k in enumerate(sybils):
        s.add_record(KEY, make_record(k, TOPIC, f"93.184.216.{i + 1}", 7000, now=T0, ttl=600 + i))
    kept = s.records(KEY)
    assert len(kept) == 8 and all(r.expires >= T0 + 632 for r in kept)
    honest = [
        make_record(k, TOPIC, host, 7000, now=T0, ttl=60)
        for k, host in zip(
            KEYS[:4], ["93.184.217.9", "2001:db9::1", "10.0.0.7", "127.0.0.1"], strict=True
        )
    ]
    assert all(s.add_record(KEY, r) for r in honest)  # short-lived, yet each has room
    more_lan = [
        make_record(k, TOPIC, f"10.0.0.{i + 20}", 7000, now=T0, ttl=60)
        for i, k in enumerate(sybils[:20])
    ]
    assert all(s.add_record(KEY, r) for r in more_lan)  # site-local addresses are exempt
