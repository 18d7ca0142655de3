"""Signed peer records: who holds a release, where to reach them, and until when.

Theory of operation
-------------------
A peer record says "the node with Ed25519 key N serves topic T at HOST:PORT until time E". A
topic is either a manifest id (the swarm of one build) or an app id (every build of an app, so a
node holding build N can be found as a partial seed by nodes fetching build N+1).

Records travel through strangers (DHT nodes store and forward them), so each one is signed by
the announcing node and everything about it is checked before it is believed:

* the encoding is strict canonical bencode, ``{r: <body dict>, s: <64-byte signature>}``, at most
  ``MAX_RECORD_BYTES`` long, with exactly the expected keys and types;
* the signature is ``keys.sign(node_key, RECORD_DOMAIN, encode(body))``, so a signature made for
  a manifest or any other purpose can never pass as a peer record;
* the expiry is in the future, and not further away than ``MAX_TTL`` (plus a clock-skew
  allowance), so nobody can pin a record into other nodes' storage for long;
* the address is an IP literal and the port is in 1..65535.

Several records travel together as a *bundle*: the canonical bencode of a list of encoded
records. Bundles are what DHT nodes store and answer with (one key, many announcers); a bad
record inside a bundle is dropped on its own and never poisons the good ones.

Everything in this module is sans-IO: time comes in as ``now`` (Unix seconds).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...errors import (
    ExpiredRecordError,
    ManifestError,
    PeerRecordError,
    RecordSignatureError,
    SignatureError,
)
from ...release import canonical
from ...release.keys import node_id_of, public_key_bytes, sign, verify_signature

__all__ = [
    "CLOCK_SKEW",
    "DHT_KEY_BYTES",
    "MAX_APP_ID_BYTES",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_RECORDS",
    "MAX_RECORD_BYTES",
    "MAX_TTL",
    "RECORD_DOMAIN",
    "ExpiredRecordError",
    "PeerRecord",
    "PeerRecordError",
    "RecordSignatureError",
    "Topic",
    "decode_bundle",
    "encode_bundle",
    "make_record",
    "parse_record",
]

RECORD_DOMAIN = b"p2pnode-peer-record-v1"
KEY_DOMAIN = b"p2pnode-dht-key-v1"
RECORD_VERSION = 1

#: A record is about 230 bytes with an IPv6 address and a 64-byte app id; 512 leaves room and
#: still lets ``MAX_BUNDLE_RECORDS`` of them fit in one UDP datagram.
MAX_RECORD_BYTES = 512
#: Records per bundle: 32 x ~230 bytes is ~7.5 KB, under rpcudp's 8 KB request limit, so a
#: bundle can be both stored (a request) and returned (a reply).
MAX_BUNDLE_RECORDS = 32
MAX_BUNDLE_BYTES = 8000
#: Longest lifetime a record may claim. Announcers re-announce well before this (node.py).
MAX_TTL = 2 * 3600
#: How far ahead of our clock an announcer's clock may be before its records look too long-lived.
CLOCK_SKEW = 300
MAX_APP_ID_BYTES = 64
MANIFEST_ID_BYTES = 32
DHT_KEY_BYTES = 20

_KIND_MANIFEST = b"m"
_KIND_APP = b"a"
_BODY_KEYS = frozenset({b"e", b"h", b"k", b"n", b"p", b"t", b"v"})


@dataclass(frozen=True, slots=True)
class Topic:
    """What a record is about: one build's manifest id, or every build of one app."""

    kind: bytes
    ident: bytes

    def __post_init__(self) -> None:
        if self.kind == _KIND_MANIFEST:
            if len(self.ident) != MANIFEST_ID_BYTES:
                raise PeerRecordError(
                    f"a manifest topic needs a {MANIFEST_ID_BYTES}-byte manifest id, "
                    f"got {len(self.ident)} bytes"
                )
        elif self.kind == _KIND_APP:
            if not 1 <= len(self.ident) <= MAX_APP_ID_BYTES:
                raise PeerRecordError(
                    f"an app topic needs an app id of 1..{MAX_APP_ID_BYTES} bytes, "
                    f"got {len(self.ident)} bytes"
                )
        else:
            raise PeerRecordError(f"unknown topic kind {self.kind!r}")

    @classmethod
    def manifest(cls, manifest_id: bytes) -> Topic:
        return cls(_KIND_MANIFEST, bytes(manifest_id))

    @classmethod
    def app(cls, app: str | bytes) -> Topic:
        return cls(_KIND_APP, app.encode() if isinstance(app, str) else bytes(app))

    @property
    def dht_key(self) -> bytes:
        """The 160-bit DHT key: a domain-separated hash, so topics of the two kinds (and other
        users of the same DHT) can never collide, and nobody picks where a topic lives."""
        h = blake3.blake3(KEY_DOMAIN + b"\x00" + self.kind + b"\x00" + self.ident)
        return h.digest()[:DHT_KEY_BYTES]

    def __str__(self) -> str:
        if self.kind == _KIND_MANIFEST:
            return f"manifest:{self.ident.hex()}"
        return f"app:{self.ident.decode('utf-8', 'replace')}"


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A verified peer record. Build with ``make_record`` or ``parse_record`` only: both
    guarantee that ``encoded`` is the canonical, correctly signed form of the other fields."""

    topic: Topic
    public_key: bytes
    host: str
    port: int
    expires: int
    signature: bytes
    encoded: bytes = field(repr=False)

    @property
    def node_id(self) -> bytes:
        return node_id_of(self.public_key)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def is_fresh(self, now: float) -> bool:
        return self.expires > now


def _check_address(host: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise PeerRecordError(f"record address {host!r} is not an IP address") from exc
    if ip.is_unspecified or ip.is_multicast:
        raise PeerRecordError(f"record address {host} cannot be connected to")
    if not 1 <= port <= 65535:
        raise PeerRecordError(f"record port {port} is out of range")
    return ip.compressed


def _check_expiry(expires: int, now: float) -> None:
    if expires <= now:
        raise ExpiredRecordError(f"record expired {int(now - expires)} s ago")
    if expires > now + MAX_TTL + CLOCK_SKEW:
        raise ExpiredRecordError(
            f"record claims to live {int(expires - now)} s, over the limit of {MAX_TTL} s"
        )


def _body(topic: Topic, public: bytes, host: str, port: int, expires: int) -> dict[bytes, Any]:
    return {
        b"e": expires,
        b"h": host.encode("ascii"),
        b"k": topic.kind,
        b"n": public,
        b"p": port,
        b"t": topic.ident,
        b"v": RECORD_VERSION,
    }


def make_record(
    key: Ed25519PrivateKey, topic: Topic, host: str, port: int, *, now: float, ttl: float
) -> PeerRecord:
    """Sign a record announcing that ``key``'s node serves ``topic`` at ``host:port``.

    Raises:
        PeerRecordError: the address is not an IP literal, the port is out of range, or
            ``ttl`` is not in (0, MAX_TTL].
    """
    if not 0 < ttl <= MAX_TTL:
        raise PeerRecordError(f"record ttl {ttl} s is not in (0, {MAX_TTL}]")
    host = _check_address(host, port)
    expires = int(now + ttl)
    public = public_key_bytes(key)
    body = _body(topic, public, host, port, expires)
    signature = sign(key, RECORD_DOMAIN, canonical.encode(body))
    encoded = canonical.encode({b"r": body, b"s": signature})
    if len(encoded) > MAX_RECORD_BYTES:  # cannot happen with the bounds above; keep it checked
        raise PeerRecordError(f"record is {len(encoded)} bytes, over {MAX_RECORD_BYTES}")
    return PeerRecord(topic, public, host, port, expires, signature, encoded)


def _field(body: dict[bytes, Any], name: bytes, kind: type) -> Any:
    value = body[name]
    if type(value) is not kind:
        raise PeerRecordError(f"record field {name.decode()} has the wrong type")
    return value


def parse_record(data: bytes, *, now: float) -> PeerRecord:
    """Parse and fully verify one encoded record.

    Raises:
        PeerRecordError: malformed, oversized or non-canonical bytes, or bad field values.
        RecordSignatureError: the signature does not verify with the key the record names.
        ExpiredRecordError: expired, or claiming a lifetime over ``MAX_TTL``.
    """
    if type(data) is not bytes:
        raise PeerRecordError("record is not a byte string")
    try:
        doc = canonical.decode(data, what="peer record", max_size=MAX_RECORD_BYTES)
    except ManifestError as exc:
        raise PeerRecordError(exc.message) from exc
    if type(doc) is not dict or set(doc) != {b"r", b"s"}:
        raise PeerRecordError("record is not a {r, s} dictionary")
    body, signature = doc[b"r"], doc[b"s"]
    if type(body) is not dict or set(body) != _BODY_KEYS:
        raise PeerRecordError("record body does not have exactly the expected fields")
    if type(signature) is not bytes or len(signature) != 64:
        raise PeerRecordError("record signature is not 64 bytes")
    if _field(body, b"v", int) != RECORD_VERSION:
        raise PeerRecordError(f"record version {body[b'v']} is not supported")
    public = _field(body, b"n", bytes)
    if len(public) != 32:
        raise PeerRecordError("record node key is not 32 bytes")
    topic = Topic(_field(body, b"k", bytes), _field(body, b"t", bytes))
    try:
        host_text = _field(body, b"h", bytes).decode("ascii")
    except UnicodeDecodeError as exc:
        raise PeerRecordError("record address is not ASCII") from exc
    port = _field(body, b"p", int)
    host = _check_address(host_text, port)
    if host != host_text:
        raise PeerRecordError("record address is not in its compressed canonical form")
    expires = _field(body, b"e", int)
    _check_expiry(expires, now)
    try:
        verify_signature(public, signature, RECORD_DOMAIN, canonical.encode(body))
    except SignatureError as exc:
        raise RecordSignatureError(f"peer record for {topic}: {exc.message}") from exc
    return PeerRecord(topic, public, host, port, expires, signature, bytes(data))


def encode_bundle(records: Iterable[PeerRecord | bytes]) -> bytes:
    """Encode up to ``MAX_BUNDLE_RECORDS`` records as one bundle (extra records are left out)."""
    items: list[bytes] = []
    size = 2
    for rec in records:
        raw = rec.encoded if isinstance(rec, PeerRecord) else rec
        size += len(raw) + len(str(len(raw))) + 1
        if len(items) >= MAX_BUNDLE_RECORDS or size > MAX_BUNDLE_BYTES:
            break
        items.append(raw)
    return canonical.encode(items)


def decode_bundle(data: object) -> list[bytes]:
    """Split a bundle into its encoded records, *without* verifying them (``parse_record`` does
    that one by one, so one bad record costs only itself).

    Raises:
        PeerRecordError: not a bundle, oversized, or holding more than ``MAX_BUNDLE_RECORDS``.
    """
    if type(data) is not bytes:
        raise PeerRecordError("bundle is not a byte string")
    try:
        items = canonical.decode(data, what="record bundle", max_size=MAX_BUNDLE_BYTES)
    except ManifestError as exc:
        raise PeerRecordError(exc.message) from exc
    if type(items) is not list or not all(type(i) is bytes for i in items):
        raise PeerRecordError("bundle is not a list of byte strings")
    if len(items) > MAX_BUNDLE_RECORDS:
        raise PeerRecordError(f"bundle holds {len(items)} records, over {MAX_BUNDLE_RECORDS}")
    return items
