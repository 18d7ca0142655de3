"""How a DHT node is configured (``DHTConfig``, ``--dht-bootstrap`` parsing) and how its
routing table is saved between runs: JSON, strict on load, never pickle."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import DHTError, DHTStateError, UsageError
from .lookup import Contact
from .records import MAX_TTL

__all__ = [
    "DHTConfig",
    "DHTError",
    "DHTStateError",
    "load_routing_table",
    "parse_hostport",
    "save_routing_table",
]


MAX_STATE_CONTACTS = 1024


STATE_FORMAT = "p2pnode-dht-routing-v1"


@dataclass
class DHTConfig:
    """How a DHT node listens, bootstraps and keeps its records alive.

    Attributes:
        port: UDP port (``--dht-port``); 0 picks a free one.
        interface: address to bind; ``0.0.0.0`` for all IPv4 interfaces.
        bootstrap: ``(host, port)`` pairs (``--dht-bootstrap HOST:PORT``, repeatable).
        state_path: JSON file holding the routing table between runs, or None.
        ksize: Kademlia's k (replication and bucket size); 20 as in the paper and BEP 5.
        alpha: parallel queries per lookup; 3 as in the paper.
        rpc_timeout: seconds before an unanswered RPC fails and its node leaves the table.
        stall_timeout: most seconds before an unanswered RPC stops holding a lookup up; the
            actual wait follows the measured round-trip time (lookup.RttEstimator), down to
            ``min_stall_timeout``.
        min_stall_timeout: least such wait.
        record_ttl: lifetime of our signed records (at most ``records.MAX_TTL``).
        reannounce_interval: how often ``serve_dht`` re-signs and re-stores our records.
        refresh_interval: how often ``serve_dht`` refreshes the routing table.
        save_interval: how often ``serve_dht`` saves the routing table.
        clock: the wall clock records are signed and judged fresh by (seconds since the
            epoch); tests move it instead of sleeping.
    """

    port: int = 0
    interface: str = "0.0.0.0"
    bootstrap: Sequence[tuple[str, int]] = ()
    state_path: Path | None = None
    ksize: int = 20
    alpha: int = 3
    rpc_timeout: float = 2.0
    stall_timeout: float = 0.5
    min_stall_timeout: float = 0.1
    record_ttl: float = 1800.0
    reannounce_interval: float = 600.0
    refresh_interval: float = 900.0
    save_interval: float = 300.0
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--dht-port {self.port} is not a UDP port (0..65535)")
        if not 0 < self.record_ttl <= MAX_TTL:
            raise UsageError(f"record ttl {self.record_ttl} s is not in (0, {MAX_TTL}]")
        if self.reannounce_interval >= self.record_ttl:
            raise UsageError("re-announce interval must be shorter than the record ttl")


def parse_hostport(text: str) -> tuple[str, int]:
    """Read ``HOST:PORT`` or ``[V6]:PORT`` (``--dht-bootstrap``).

    Raises:
        UsageError: no port, or a port out of range.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(
            f"{text!r} is not HOST:PORT",
            fix="write bootstrap nodes as HOST:PORT, e.g. --dht-bootstrap 192.0.2.7:6881",
        )
    return host, int(port_text)


def save_routing_table(path: Path, node_id: bytes, contacts: Iterable[Contact]) -> None:
    """Write the routing table as JSON, atomically (temp file + rename)."""
    doc = {
        "format": STATE_FORMAT,
        "node_id": node_id.hex(),
        "saved_at": int(time.time()),
        "contacts": [[c.id.hex(), c.host, c.port] for c in list(contacts)[:MAX_STATE_CONTACTS]],
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_routing_table(path: Path) -> list[Contact]:
    """Read contacts saved by ``save_routing_table``; strict about every field.

    Raises:
        DHTStateError: unreadable, not JSON, or not in the expected shape.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4 * 1024 * 1024 + 1)
    except OSError as exc:
        raise DHTStateError(f"cannot read DHT routing table {path}: {exc.strerror}") from exc
    if len(text) > 4 * 1024 * 1024:
        raise DHTStateError(f"DHT routing table {path} is over 4 MiB")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DHTStateError(f"DHT routing table {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise DHTStateError(f"DHT routing table {path} is not in format {STATE_FORMAT}")
    raw = doc.get("contacts")
    if not isinstance(raw, list):
        raise DHTStateError(f"DHT routing table {path} has no contact list")
    out = []
    for item in raw[:MAX_STATE_CONTACTS]:
        contact = contact_from_wire(item, hex_id=True)
        if contact is None:
            raise DHTStateError(f"DHT routing table {path} holds a malformed contact")
        out.append(contact)
    return out


def contact_from_wire(item: object, *, hex_id: bool = False) -> Contact | None:
    """A contact from ``[id, host, port]`` as it comes off the wire (or JSON), or None."""
    if not isinstance(item, list | tuple) or len(item) != 3:
        return None
    cid, host, port = item
    if hex_id:
        if not isinstance(cid, str):
            return None
        try:
            cid = bytes.fromhex(cid)
        except ValueError:
            return None
    if type(cid) is not bytes or len(cid) != 20:
        return None
    if type(host) is not str or type(port) is not int or not 1 <= port <= 65535:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return Contact(cid, host, port)
