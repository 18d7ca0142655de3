"""Peer records: signing, strict parsing, expiry and bundles (sans-IO, property-based)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.discovery.dht.records import (
    MAX_BUNDLE_RECORDS,
    MAX_RECORD_BYTES,
    MAX_TTL,
    RECORD_DOMAIN,
    ExpiredRecordError,
    PeerRecordError,
    RecordSignatureError,
    Topic,
    decode_bundle,
    encode_bundle,
    make_record,
    parse_record,
)
from p2pnode.errors import IntegrityError, SignatureError
from p2pnode.release import canonical
from p2pnode.release.keys import public_key_bytes, sign

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
MID = bytes(range(32))

topics = st.one_of(
    st.binary(min_size=32, max_size=32).map(Topic.manifest),
    st.binary(min_size=1, max_size=64).map(Topic.app),
)
hosts = st.one_of(
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_unspecified and not ip.is_multicast),
    st.ip_addresses(v=6).filter(lambda ip: not ip.is_unspecified and not ip.is_multicast),
).map(lambda ip: ip.compressed)


def _signed(
    body: dict[bytes, object], key: Ed25519PrivateKey = KEY, domain: bytes = RECORD_DOMAIN
) -> bytes:
    sig = sign(key, domain, canonical.encode(body))
    return canonical.encode({b"r": body, b"s": sig})


def _body(**over: object) -> dict[bytes, object]:
    body: dict[bytes, object] = {
        b"e": int(NOW) + 600,
        b"h": b"192.0.2.7",
        b"k": b"m",
        b"n": public_key_bytes(KEY),
        b"p": 7000,
        b"t": MID,
        b"v": 1,
    }
    for name, value in over.items():
        if value is None:
            del body[name.encode()]
        else:
            body[name.encode()] = value
    return body


@settings(max_examples=60, deadline=None)
@given(topic=topics, host=hosts, port=st.integers(1, 65535), ttl=st.integers(1, MAX_TTL))
def test_roundtrip(topic: Topic, host: str, port: int, ttl: int) -> None:
    rec = make_record(KEY, topic, host, port, now=NOW, ttl=ttl)
    assert len(rec.encoded) <= MAX_RECORD_BYTES
    back = parse_record(rec.encoded, now=NOW)
    assert back == rec
    assert back.topic == topic and back.address == (host, port)
    assert back.expires == int(NOW + ttl)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_rejected(data: st.DataObject) -> None:
    rec = make_record(KEY, Topic.manifest(MID), "192.0.2.7", 7000, now=NOW, ttl=600)
    i = data.draw(st.integers(0, len(rec.encoded) - 1))
    b = data.draw(st.integers(0, 255).filter(lambda b: b != rec.encoded[i]))
    mutated = rec.encoded[:i] + bytes([b]) + rec.encoded[i + 1 :]
    with pytest.raises(PeerRecordError):
        parse_record(mutated, now=NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_record_errors(data: bytes) -> None:
    with pytest.raises(PeerRecordError):
        parse_record(data, now=NOW)


def test_record_errors_sit_in_the_integrity_branch() -> None:
    assert issubclass(PeerRecordError, IntegrityError)
    assert issubclass(RecordSignatureError, SignatureError)
    assert "fix:" in str(PeerRecordError("x"))


def test_expired_and_too_long_lived_records_are_rejected() -> None:
    rec = make_record(KEY, Topic.manifest(MID), "192.0.2.7", 7000, now=NOW, ttl=600)
    with pytest.raises(ExpiredRecordError):
        parse_record(rec.encoded, now=NOW + 600)
    far = _signed(_body(e=int(NOW) + MAX_TTL + 3600))
    with pytest.raises(ExpiredRecordError):
        parse_record(far, now=NOW)
    with pytest.raises(PeerRecordError):
        make_record(KEY, Topic.manifest(MID), "192.0.2.7", 7000, now=NOW, ttl=MAX_TTL + 1)


def test_signature_checks() -> None:
    assert parse_record(_signed(_body()), now=NOW).port == 7000
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    with pytest.raises(RecordSignatureError):  # signed by a key other than the one named
        parse_record(_signed(_body(), key=other), now=NOW)
    with pytest.raises(RecordSignatureError):  # a signature made for another purpose
        parse_record(_signed(_body(), domain=b"p2pnode-manifest-v1"), now=NOW)
    unsigned = canonical.encode({b"r": _body(), b"s": bytes(64)})
    with pytest.raises(RecordSignatureError):
        parse_record(unsigned, now=NOW)
    with pytest.raises(PeerRecordError):
        parse_record(canonical.encode({b"r": _body()}), now=NOW)


@pytest.mark.parametrize(
    "over",
    [
        {"h": b"example.com"},  # names are not addresses: a record must not make us resolve
        {"h": b"0.0.0.0"},
        {"h": b"224.0.0.1"},
        {"h": b"::0001"},  # not in canonical compressed form
        {"p": 0},
        {"p": 65536},
        {"v": 2},
        {"k": b"x"},
        {"t": MID[:31]},
        {"n": bytes(31)},
        {"e": b"soon"},
        {"x": 1},  # an extra field
        {"p": None},  # a missing field
    ],
)
def test_malformed_fields_are_rejected(over: dict[str, object]) -> None:
    with pytest.raises(PeerRecordError):
        parse_record(_signed(_body(**over)), now=NOW)


def test_non_canonical_and_oversized_encodings_are_rejected() -> None:
    good = _signed(_body())
    swapped = good.replace(b"1:r", b"1:R", 1)  # re-sorting breaks canonical order
    with pytest.raises(PeerRecordError):
        parse_record(swapped, now=NOW)
    with pytest.raises(PeerRecordError):
        parse_record(good + b"0:", now=NOW)  # trailing data
    with pytest.raises(PeerRecordError, match="over the limit"):
        parse_record(_signed(_body(t=b"a" * 64, k=b"a", h=b"x" * 400)), now=NOW)


def test_topic_keys_are_domain_separated() -> None:
    assert Topic.manifest(MID).dht_key != Topic.app(MID).dht_key
    assert len(Topic.app("game").dht_key) == 20
    with pytest.raises(PeerRecordError):
        Topic.app("")
    with pytest.raises(PeerRecordError):
        Topic.manifest(b"short")


def test_bundles() -> None:
    recs = [
        make_record(KEY, Topic.manifest(MID), "192.0.2.7", 7000 + i, now=NOW, ttl=600)
        for i in range(MAX_BUNDLE_RECORDS + 5)
    ]
    items = decode_bundle(encode_bundle(recs))
    assert items == [r.encoded for r in recs[:MAX_BUNDLE_RECORDS]]
    for bad in [b"", b"le", b"i3e", b"l" + b"i1e" + b"e", canonical.encode([b"x"] * 40), 5]:
        if bad == b"le":
            assert decode_bundle(bad) == []
            continue
        with pytest.raises(PeerRecordError):
            decode_bundle(bad)
