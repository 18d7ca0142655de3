"""The tracker's pure core: the signed messages nodes send, verified and parsed. No I/O here.

Theory of operation
-------------------
Nodes talk to the tracker in two signed messages, *announce* and *report*. Each is a JSON
object sent as the HTTP request body; the node signs the body bytes **verbatim** with
``keys.sign(node_key, DOMAIN, body)`` and sends the 64-byte signature as 128 hex digits in the
``X-P2PNode-Signature`` header. Signing the exact bytes (rather than a re-serialisation of the
parsed JSON) means no canonical JSON is needed: the tracker checks the signature over what it
received, *then* parses it. The domain tags differ per message type, so an announce signature
can never be replayed as a report, a manifest or a DHT record.

The node's identity is the ``key`` field (``ed25519:<hex>``); its id is
``keys.node_id_of(key)``, computed here, never taken from the message. ``ts`` (Unix seconds)
must lie within ``MAX_SKEW`` of the tracker's clock and ``nonce`` makes every message unique;
the store remembers the digest of every signature it accepted for ``2 * MAX_SKEW``, so a captured
message cannot be replayed (see ``MemorySwarm.fresh``).

Parsing is strict: unknown fields, wrong types, out-of-range numbers and oversized bodies raise
:class:`BadRequest` (HTTP 400) before anything is stored. The functions here take ``now`` as an
argument so tests drive them with explicit times.

Peer quality and the ranking rule: :mod:`tracker.quality`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pnode.discovery.tracker_api import (
    ANNOUNCE_DOMAIN,
    CLIENT_PATTERN,
    REPORT_DOMAIN,
    SIGNATURE_HEADER,
)
from p2pnode.errors import P2PNodeError, SignatureError
from p2pnode.release import keys
from p2pnode.release.manifest import NAME_PATTERN

from .errors import BadRequest, Forbidden, TooLarge

__all__ = [
    "ANNOUNCE_DOMAIN",
    "HEX40_PATTERN",
    "HEX64_PATTERN",
    "MAX_ANNOUNCE_BYTES",
    "MAX_BYTES",
    "MAX_COUNT",
    "MAX_NUMWANT",
    "MAX_PORT",
    "MAX_RATE",
    "MAX_RECORDS",
    "MAX_RECORD_HEX",
    "MAX_REPORT_BYTES",
    "MAX_REPORT_PEERS",
    "MAX_SKEW",
    "MAX_TS",
    "NONCE_PATTERN",
    "REPORT_DOMAIN",
    "SIGNATURE_HEADER",
    "Announce",
    "PeerReport",
    "Report",
    "parse_announce",
    "parse_report",
]


#: Clock skew tolerated between a node and the tracker (seconds); replays are remembered for
#: twice this, so a message is either too old or already seen.
MAX_SKEW = 300
MAX_ANNOUNCE_BYTES = 4096
MAX_REPORT_BYTES = 16 * 1024
MAX_REPORT_PEERS = 64
#: Peers in one announce answer, at most (BitTorrent trackers settle on 50 too).
MAX_NUMWANT = 50
DEFAULT_NUMWANT = 30
MAX_BYTES = 1 << 50
MAX_RATE = 1 << 40
MAX_COUNT = 1_000_000

EVENTS = ("started", "update", "completed", "stopped")
MAX_PORT = 65535
MAX_TS = 1 << 40
#: Peer records an announce may attach.
MAX_RECORDS = 2
#: Hex characters of one attached peer record.
MAX_RECORD_HEX = 1024
#: Patterns as strings: the checks below and tracker.openapi's schemas share them.
HEX64_PATTERN = r"^[0-9a-f]{64}$"
HEX40_PATTERN = r"^[0-9a-f]{40}$"
NONCE_PATTERN = r"^[0-9a-f]{16,64}$"
_NAME = re.compile(NAME_PATTERN)
_HEX64 = re.compile(HEX64_PATTERN)
_HEX40 = re.compile(HEX40_PATTERN)
_NONCE = re.compile(NONCE_PATTERN)
_CLIENT = re.compile(CLIENT_PATTERN)


@dataclass(frozen=True, slots=True)
class Announce:
    public_key: bytes
    node_id: bytes
    ts: int
    app: str
    manifest: bytes
    ip: str | None
    port: int
    event: str
    size: int
    left: int
    from_peers: int
    from_cdn: int
    uploaded: int
    numwant: int
    records: tuple[bytes, ...]
    #: the node's p2pnode version (``tracker_api.CLIENT_FIELD``); None from older nodes
    client: str | None = None


@dataclass(frozen=True, slots=True)
class PeerReport:
    node_id: bytes
    bytes: int
    rate: int
    failures: int
    corrupt: int


@dataclass(frozen=True, slots=True)
class Report:
    public_key: bytes
    node_id: bytes
    ts: int
    peers: tuple[PeerReport, ...]


def verify_signed_body(
    body: bytes,
    signature_hex: str | None,
    domain: bytes,
    vouched: Callable[[bytes], bool] | None = None,
) -> dict[str, Any]:
    """Check ``body`` is JSON whose ``key`` signed it under ``domain``; return the object.

    ``vouched(node_id)`` may say the key's node was proven recently from where this request
    comes (an announce session); the signature is then well-formed but not checked again.

    Raises:
        BadRequest: not a JSON object, or no/garbled signature header.
        Forbidden: the signature does not verify with the key the body names.
    """
    return _verified(body, signature_hex, domain, vouched)[0]


def _verified(
    body: bytes,
    signature_hex: str | None,
    domain: bytes,
    vouched: Callable[[bytes], bool] | None,
) -> tuple[dict[str, Any], bytes, bytes]:
    """:func:`verify_signed_body`, also returning the public key and node id it checked."""
    if not signature_hex:
        raise BadRequest(f"missing {SIGNATURE_HEADER} header")
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        signature = b""
    if len(signature) != 64:
        raise BadRequest(f"{SIGNATURE_HEADER} must be 128 hex digits")
    obj = _json_object(body)
    public = _key(obj.get("key"))
    node_id = keys.node_id_of(public)
    if vouched is not None and vouched(node_id):
        return obj, public, node_id
    try:
        keys.verify_signature(public, signature, domain, body)
    except SignatureError as exc:
        raise Forbidden(f"signature does not verify with {keys.format_public_key(public)}") from exc
    return obj, public, node_id


_ANNOUNCE_REQUIRED = frozenset({"key", "ts", "nonce", "app", "manifest", "port"})
_ANNOUNCE_OPTIONAL = frozenset(
    {
        "ip",
        "event",
        "size",
        "left",
        "from_peers",
        "from_cdn",
        "uploaded",
        "numwant",
        "records",
        "client",
    }
)
_ANNOUNCE_FIELDS = _ANNOUNCE_REQUIRED | _ANNOUNCE_OPTIONAL


def parse_announce(
    body: bytes,
    signature_hex: str | None,
    *,
    now: float,
    max_bytes: int = MAX_ANNOUNCE_BYTES,
    vouched: Callable[[bytes], bool] | None = None,
) -> Announce:
    """Verify and parse a signed announce. See docs/tracker-api.md for every field.
    ``vouched(node_id)``: as in ``verify_signed_body`` (announce sessions).

    This runs for every announce, so the common case is kept to cheap checks (the field set
    against precomputed sets; the key parsed and hashed once); the checks are the same."""
    if len(body) > max_bytes:
        raise TooLarge(f"announce body is {len(body)} bytes, the limit is {max_bytes}")
    obj, public, node_id = _verified(body, signature_hex, ANNOUNCE_DOMAIN, vouched)
    present = obj.keys()
    if not (present <= _ANNOUNCE_FIELDS and present >= _ANNOUNCE_REQUIRED):
        _only(obj, required=set(_ANNOUNCE_REQUIRED), optional=set(_ANNOUNCE_OPTIONAL))
    ts = _ts(obj, now)
    _nonce(obj)
    app = _name(obj, "app")
    manifest = _hex_id(obj, "manifest")
    port = _int(obj, "port", 0, MAX_PORT)  # 0: not reachable (counted, never handed out)
    ip = obj.get("ip")
    if ip is not None:
        ip = _ip(ip)
    event = obj.get("event", "update")
    if event not in EVENTS:
        raise BadRequest(f"event must be one of {', '.join(EVENTS)}")
    size = _int(obj, "size", 0, MAX_BYTES, 0)
    left = _int(obj, "left", 0, MAX_BYTES, size)
    if left > size:
        raise BadRequest("left is larger than size")
    if event == "completed" and left != 0:
        raise BadRequest("a completed announce must have left = 0")
    records: list[bytes] = []
    if "records" in obj:
        records_raw = obj["records"]
        if not isinstance(records_raw, list) or len(records_raw) > MAX_RECORDS:
            raise BadRequest("records must be a list of at most 2 hex strings")
        if records_raw and port == 0:
            raise BadRequest("a node that does not serve (port 0) has no peer records to attach")
        for r in records_raw:
            if not isinstance(r, str) or len(r) > MAX_RECORD_HEX:
                raise BadRequest("each record must be a hex string of at most 512 bytes")
            try:
                records.append(bytes.fromhex(r))
            except ValueError as exc:
                raise BadRequest("records must be hex") from exc
    return Announce(
        public_key=public,
        node_id=node_id,
        ts=ts,
        app=app,
        manifest=manifest,
        ip=ip,
        port=port,
        event=event,
        size=size,
        left=left,
        from_peers=_int(obj, "from_peers", 0, MAX_BYTES, 0),
        from_cdn=_int(obj, "from_cdn", 0, MAX_BYTES, 0),
        uploaded=_int(obj, "uploaded", 0, MAX_BYTES, 0),
        numwant=_int(obj, "numwant", 0, MAX_NUMWANT, DEFAULT_NUMWANT),
        records=tuple(records),
        client=_client(obj.get("client")),
    )


def parse_report(
    body: bytes, signature_hex: str | None, *, now: float, max_bytes: int = MAX_REPORT_BYTES
) -> Report:
    """Verify and parse a signed peer-quality report. See docs/tracker-api.md."""
    if len(body) > max_bytes:
        raise TooLarge(f"report body is {len(body)} bytes, the limit is {max_bytes}")
    obj = verify_signed_body(body, signature_hex, REPORT_DOMAIN)
    _only(obj, required={"key", "ts", "nonce", "peers"}, optional=set())
    public = _key(obj["key"])
    node_id = keys.node_id_of(public)
    ts = _ts(obj, now)
    _nonce(obj)
    raw = obj["peers"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_REPORT_PEERS:
        raise BadRequest(f"peers must be a list of 1 to {MAX_REPORT_PEERS} entries")
    entries: dict[bytes, PeerReport] = {}
    for item in raw:
        if not isinstance(item, dict):
            raise BadRequest("each peers entry must be an object")
        _only(item, required={"node_id"}, optional={"bytes", "rate", "failures", "corrupt"})
        nid_text = item["node_id"]
        if not isinstance(nid_text, str) or not _HEX40.match(nid_text):
            raise BadRequest("node_id must be 40 lowercase hex digits")
        nid = bytes.fromhex(nid_text)
        if nid == node_id:
            raise BadRequest("a node cannot report on itself")
        if nid in entries:
            raise BadRequest(f"node {nid_text} appears twice in one report")
        entries[nid] = PeerReport(
            node_id=nid,
            bytes=_int(item, "bytes", 0, MAX_BYTES, 0),
            rate=_int(item, "rate", 0, MAX_RATE, 0),
            failures=_int(item, "failures", 0, MAX_COUNT, 0),
            corrupt=_int(item, "corrupt", 0, MAX_COUNT, 0),
        )
    return Report(public_key=public, node_id=node_id, ts=ts, peers=tuple(entries.values()))


def check_name(value: str, what: str) -> str:
    """App and channel names: the manifest's rule (letters, digits, ``._-``, at most 64)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadRequest(f"{what} {value!r} is not a valid name (letters, digits, . _ -)")
    return value


def check_manifest_id(value: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise BadRequest("manifest id must be 64 lowercase hex digits")
    return bytes.fromhex(value)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode())  # UTF-8 (docs/tracker-api.md); no encoding sniffing
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    return obj


def json_object(body: bytes) -> dict[str, Any]:
    return _json_object(body)


def _only(obj: dict[str, Any], *, required: set[str], optional: set[str]) -> None:
    missing = required - obj.keys()
    if missing:
        raise BadRequest(f"missing fields: {', '.join(sorted(missing))}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")


def _key(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("key must be a string ed25519:<64 hex>")
    try:
        return keys.parse_public_key(value)
    except P2PNodeError as exc:
        raise BadRequest("key must be ed25519:<64 hex>") from exc


def as_int(value: Any) -> int | None:
    """A JSON integer: ``5``, or ``5.0`` (JSON Schema, which /openapi.json declares these fields
    in, counts a number without a fraction as an integer); None for anything else, bools too."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _int(obj: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = obj.get(name, default)
    if value is None:
        raise BadRequest(f"missing field {name}")
    number = as_int(value)
    if number is None or not lo <= number <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]")
    return number


def _ts(obj: dict[str, Any], now: float) -> int:
    ts = _int(obj, "ts", 0, MAX_TS)
    if abs(ts - now) > MAX_SKEW:
        raise Forbidden(
            f"message timestamp {ts} is {int(ts - now):+d} s from the tracker's clock",
            fix=f"sync this machine's clock (tolerance {MAX_SKEW} s) and sign a fresh message",
        )
    return ts


def _nonce(obj: dict[str, Any]) -> None:
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise BadRequest("nonce must be 16 to 64 lowercase hex digits")


def _name(obj: dict[str, Any], field: str) -> str:
    return check_name(obj.get(field), field)  # type: ignore[arg-type]


def _hex_id(obj: dict[str, Any], field: str) -> bytes:
    value = obj.get(field)
    if not isinstance(value, str) or not _HEX64.match(value):
        raise BadRequest(f"{field} must be 64 lowercase hex digits")
    return bytes.fromhex(value)


def _client(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CLIENT.match(value):
        raise BadRequest("client must be a version: 1 to 32 of letters, digits and . + ! _ -")
    return value


def _ip(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise BadRequest("ip must be an IP address literal")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise BadRequest("ip must be an IP address literal") from exc
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        raise BadRequest(f"ip {value} cannot be reached by peers")
    return addr.compressed


def plausible_ip(claimed: str | None, seen: str) -> str:
    """The address peers should dial: the claimed one only when it is plausible.

    A node behind the same NAT or on the same private network as the tracker may know a better
    address than the one the tracker sees; but a node on the public internet must not be able to
    point the swarm at somebody else's public address (a reflection attack). So a claimed
    address is used when it equals the seen one, or when the seen one is private/loopback (the
    tracker serves a LAN, where nodes know their addresses best) and the claimed one is private
    or loopback too. Otherwise the seen address wins.
    """
    if claimed is None or claimed == seen:
        return seen
    try:
        seen_addr = ipaddress.ip_address(seen)
        claim_addr = ipaddress.ip_address(claimed)
    except ValueError:
        return seen
    local_seen = seen_addr.is_private or seen_addr.is_loopback
    local_claim = claim_addr.is_private or claim_addr.is_loopback
    return claimed if local_seen and local_claim else seen
