"""The DHT node: the ``kademlia`` package's wire protocol, run from a trio program.

Theory of operation
-------------------
Three layers, bottom up:

``DHTProtocol`` (asyncio, a ``KademliaProtocol`` subclass) speaks the package's UDP/msgpack RPCs
(ping, store, find_node, find_value) so that it interoperates with itself and keeps the
package's routing table (k-buckets, replacement caches, splitting). It changes what the package
gets wrong for us:

* every datagram is handled synchronously in ``datagram_received`` (the package spawns a task
  per datagram), after a size check and a per-address token bucket; undecodable datagrams,
  unknown RPCs and arguments of the wrong type or size are dropped without an answer, so a
  flood costs bounded CPU and no memory;
* STORE merges into ``RecordStorage`` (multi-value, verified, bounded: storage.py) instead of
  overwriting, and FIND_VALUE answers with the key's record bundle *and* the closest nodes, so a
  lookup can keep going and collect the announcers stored on every close node;
* replication to newly seen nodes uses the right key (the package hashes an already hashed key)
  and only targets nodes actually admitted to the routing table.

``_AioCore`` (asyncio) drives lookups with the sans-IO ``Lookup`` (lookup.py), announces signed
records at the k nodes closest to the topic's key, and merges lookup results: records from the
network, from local storage, and this node's own freshly signed records (the package's ``get``
returns a node's own stale local copy first; we never do: every source is merged and the latest
expiry per announcer wins). Every record is verified and expiry-checked before it is returned.

``DHTNode`` (trio) is the only thing the rest of p2pnode sees. It reaches the asyncio layers
through a *bridge*: ``TrioAsyncioBridge`` runs the asyncio loop inside trio's thread with
``trio_asyncio`` (``open_loop`` + ``aio_as_trio``); ``ThreadBridge`` runs a plain asyncio loop
in a dedicated thread and hands results back through the trio token. Which one is the default,
and why, is measured in docs/discovery.md. ``serve_dht`` adds the periodic jobs: re-announce
before records expire, refresh the routing table, and save it as JSON (never pickle) so the
next run can bootstrap from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import umsgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from ...errors import DHTError, DHTStateError, UsageError
from ...release.keys import node_id_of, public_key_bytes
from .lookup import Contact, Lookup, RttEstimator
from .records import (
    MAX_BUNDLE_BYTES,
    MAX_TTL,
    PeerRecord,
    PeerRecordError,
    Topic,
    decode_bundle,
    encode_bundle,
    make_record,
    parse_record,
)
from .storage import RecordStorage

__all__ = [
    "DHTConfig",
    "DHTError",
    "DHTNode",
    "DHTStateError",
    "LookupResult",
    "ThreadBridge",
    "TrioAsyncioBridge",
    "load_routing_table",
    "open_bridge",
    "open_dht_node",
    "parse_hostport",
    "save_routing_table",
    "serve_dht",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: rpcudp never sends a request over 8 KB; answers carry at most one bundle (8000 bytes) plus
#: k contacts. Anything much larger is not ours.
MAX_DATAGRAM = 16 * 1024
#: Per source address: enough for a busy honest peer (a lookup sends it one query; a bootstrap
#: a handful), far below what it takes to keep a core busy (~20 us per request).
RATE_PER_SECOND = 200.0
RATE_BURST = 400.0
#: Addresses tracked by the rate limiter; the least recently seen are forgotten first.
RATE_TABLE_SIZE = 4096
#: A node that stalled or failed a query is not asked again by lookups for this long, unless
#: it shows it is alive by sending us anything. Bounded like the rate table.
SUSPECT_SECONDS = 60.0
#: Most records a lookup returns, and most distinct encodings it will verify.
MAX_LOOKUP_RECORDS = 256
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


# -- routing table persistence --------------------------------------------------------------


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
        contact = _contact_from_wire(item, hex_id=True)
        if contact is None:
            raise DHTStateError(f"DHT routing table {path} holds a malformed contact")
        out.append(contact)
    return out


def _contact_from_wire(item: object, *, hex_id: bool = False) -> Contact | None:
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


# -- asyncio side: the protocol -------------------------------------------------------------


class _BadRequest(Exception):
    """An RPC whose arguments are not what the protocol sends; dropped without an answer."""


class _RateLimiter:
    """Token bucket per source address, over a bounded LRU table of addresses."""

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate, self.burst, self.size = rate, burst, size
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()

    def allow(self, addr: Any, now: float) -> bool:
        tokens, last = self._buckets.pop(addr, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[addr] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        return ok


def _check_id(value: object) -> bytes:
    if type(value) is not bytes or len(value) != 20:
        raise _BadRequest("id is not 20 bytes")
    return value


class DHTProtocol(KademliaProtocol):
    """The package's protocol with validated, synchronous, rate-limited request handling."""

    storage: RecordStorage

    def __init__(
        self, source_node: Node, storage: RecordStorage, ksize: int, rpc_timeout: float
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = rpc_timeout
        self._limiter = _RateLimiter(RATE_PER_SECOND, RATE_BURST, RATE_TABLE_SIZE)
        self._handlers: dict[str, Callable[..., Any]] = {
            "ping": self.rpc_ping,
            "store": self.rpc_store,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
            "stun": self.rpc_stun,
        }
        self._background: set[asyncio.Future[Any]] = set()
        self._suspects: OrderedDict[tuple[str, int], float] = OrderedDict()
        self.requests_handled = 0
        self.requests_dropped = 0

    def mark_suspect(self, addr: tuple[str, int]) -> None:
        self._suspects.pop(addr, None)
        self._suspects[addr] = time.monotonic() + SUSPECT_SECONDS
        if len(self._suspects) > RATE_TABLE_SIZE:
            self._suspects.popitem(last=False)

    def is_suspect(self, addr: tuple[str, int]) -> bool:
        until = self._suspects.get(addr)
        if until is None:
            return False
        if until < time.monotonic():
            del self._suspects[addr]
            return False
        return True

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 22 or len(data) > MAX_DATAGRAM:
            self.requests_dropped += 1
            return
        kind, msg_id = data[:1], data[1:21]
        if self._suspects:
            self._suspects.pop(addr[:2], None)  # it is alive after all
        try:
            payload = umsgpack.unpackb(data[21:])
        except Exception:  # untrusted datagram: the decoder signals bad input with many types
            self.requests_dropped += 1
            return
        if kind == b"\x01":
            if msg_id in self._outstanding:
                self._accept_response(msg_id, payload, addr)
            return
        if kind != b"\x00" or not self._limiter.allow(addr[:2], time.monotonic()):
            self.requests_dropped += 1
            return
        if (
            not isinstance(payload, list)
            or len(payload) != 2
            or not isinstance(payload[1], list)
            or (handler := self._handlers.get(payload[0])) is None
        ):
            self.requests_dropped += 1
            return
        try:
            response = handler(addr, *payload[1])
        except (_BadRequest, TypeError):  # TypeError: wrong number of arguments
            self.requests_dropped += 1
            return
        self.requests_handled += 1
        if self.transport is not None:
            self.transport.sendto(b"\x01" + msg_id + umsgpack.packb(response), addr)

    def rpc_ping(self, sender: Any, nodeid: object) -> bytes:
        self.welcome_if_new(Node(_check_id(nodeid), sender[0], sender[1]))
        return bytes(self.source_node.id)

    def rpc_store(self, sender: Any, nodeid: object, key: object, value: object) -> bool:
        source = Node(_check_id(nodeid), sender[0], sender[1])
        key = _check_id(key)
        if type(value) is not bytes or len(value) > MAX_BUNDLE_BYTES:
            raise _BadRequest("store value is not a bundle")
        self.welcome_if_new(source)
        return self.storage.add_bundle(key, value) > 0

    def rpc_find_node(self, sender: Any, nodeid: object, key: object) -> list[tuple[Any, ...]]:
        source = Node(_check_id(nodeid), sender[0], sender[1])
        target = Node(_check_id(key))
        self.welcome_if_new(source)
        return [tuple(n) for n in self.router.find_neighbors(target, exclude=source)]

    def rpc_find_value(self, sender: Any, nodeid: object, key: object) -> dict[str, Any]:
        nodes = self.rpc_find_node(sender, nodeid, key)
        return {"nodes": nodes, "values": self.storage.get(_check_id(key))}

    def welcome_if_new(self, node: Node) -> None:
        """Admit ``node`` to the routing table and hand it the records it should now hold
        (Kademlia section 2.5: it is among the k closest to a key and we are the closest).

        The scan over our keys runs only when the node is really admitted, not when it lands
        in a full bucket's replacement cache: such a node stays "new" and would otherwise
        make every one of its requests cost a scan.
        """
        if not self.router.is_new_node(node):
            return
        self.router.add_contact(node)
        bucket = self.router.buckets[self.router.get_bucket_for(node)]
        if bucket[node.id] is None or not self.storage.key_count:
            return
        for key, bundle in self.storage:
            keynode = Node(key)
            others = self.router.find_neighbors(keynode, exclude=node)
            if others:
                mine = self.source_node.distance_to(keynode)
                theirs = node.distance_to(keynode)
                if not (
                    theirs < others[-1].distance_to(keynode)
                    and mine < others[0].distance_to(keynode)
                ):
                    continue
            task = asyncio.ensure_future(self.call_store(node, key, bundle))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        future, timeout = self._outstanding.pop(msg_id)
        timeout.cancel()
        if not future.done():  # the caller may have given up (cancelled) meanwhile
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))


# -- asyncio side: lookups and announces ----------------------------------------------------


@dataclass
class LookupResult:
    """What one lookup found and what it cost."""

    records: list[PeerRecord]
    queries: int = 0
    answers: int = 0
    failures: int = 0
    seconds: float = 0.0
    rejected: int = 0


@dataclass
class _Announcement:
    host: str
    port: int
    record: PeerRecord | None = None


class _AioCore:
    """Everything that runs on the asyncio loop. Not thread-safe: call only on that loop."""

    def __init__(self, key: Ed25519PrivateKey, config: DHTConfig, storage: RecordStorage) -> None:
        self.key = key
        self.config = config
        self.node = Node(node_id_of(public_key_bytes(key)))
        self.storage = storage
        self.protocol: DHTProtocol | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.announcements: dict[Topic, _Announcement] = {}
        self.rtt = RttEstimator(floor=config.min_stall_timeout, ceiling=config.stall_timeout)

    @property
    def proto(self) -> DHTProtocol:
        if self.protocol is None:
            raise RuntimeError("the DHT node is not started")
        return self.protocol

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: DHTProtocol(
                    self.node, self.storage, self.config.ksize, self.config.rpc_timeout
                ),
                local_addr=(self.config.interface, self.config.port),
            )
        except OSError as exc:
            raise DHTError(
                f"cannot listen on UDP {self.config.interface}:{self.config.port}: {exc.strerror}",
                fix="choose another --dht-port, or stop the process using this one",
            ) from exc
        self.transport = transport
        self.protocol = protocol
        return int(transport.get_extra_info("sockname")[1])

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def contacts(self) -> list[Contact]:
        return [
            Contact(n.id, n.ip, n.port)
            for bucket in self.proto.router.buckets
            for n in bucket.get_nodes()
        ]

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> int:
        """Ping ``addrs``, then look ourselves up to fill the routing table."""
        proto = self.proto
        results = await asyncio.gather(*(proto.ping(a, self.node.id) for a in addrs))
        for (ok, nid), addr in zip(results, addrs, strict=True):
            if ok and type(nid) is bytes and len(nid) == 20 and nid != self.node.id:
                proto.welcome_if_new(Node(nid, addr[0], addr[1]))
        await self.crawl(self.node.id, find_value=False)
        return len(self.contacts())

    async def refresh(self) -> None:
        """Look up our own id and a random id in each bucket not used lately."""
        targets = [self.node.id, *self.proto.get_refresh_ids()]
        await asyncio.gather(*(self.crawl(t, find_value=False) for t in targets))

    async def crawl(self, target: bytes, *, find_value: bool) -> tuple[Lookup, list[bytes]]:
        """Run one iterative lookup; returns its state and the bundles found (if asked)."""
        proto = self.proto
        seeds = [
            Contact(n.id, n.ip, n.port)
            for n in proto.router.find_neighbors(Node(target), k=self.config.ksize)
        ]
        lk = Lookup(
            target,
            seeds,
            k=self.config.ksize,
            alpha=self.config.alpha,
            self_id=self.node.id,
            skip=lambda c: proto.is_suspect((c.host, c.port)),
        )
        bundles: list[bytes] = []
        pending: dict[asyncio.Future[Any], tuple[Contact, float]] = {}
        stall_handles: dict[bytes, asyncio.TimerHandle] = {}
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        method = proto.find_value if find_value else proto.find_node

        def stalled(c: Contact) -> None:
            proto.mark_suspect((c.host, c.port))
            lk.on_stalled(c)
            wake.set()

        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                for c in lk.next_queries():
                    fut = asyncio.ensure_future(method((c.host, c.port), self.node.id, target))
                    pending[fut] = (c, loop.time())
                    stall_handles[c.id] = loop.call_later(self.rtt.stall_after(), stalled, c)
                if lk.done or not pending:
                    break
                wake.clear()
                waiter = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait(
                    [*pending, waiter], return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                done.discard(waiter)
                waiter = None
                for fut in done:
                    c, sent_at = pending.pop(fut)
                    stall_handles.pop(c.id).cancel()
                    result = fut.result()
                    if result[0]:
                        self.rtt.observe(loop.time() - sent_at)
                    self._handle_answer(lk, c, result, bundles, find_value)
        finally:
            if waiter is not None:  # cancelled while waiting: do not leave the task behind
                waiter.cancel()
            for h in stall_handles.values():
                h.cancel()
            # queries still out (stalled) resolve on their own at the RPC timeout; let them
            # update the routing table then, without holding this lookup up.
            for fut, (c, _) in pending.items():
                fut.add_done_callback(functools.partial(self._late_answer, c))
        return lk, bundles

    def _late_answer(self, c: Contact, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            ok, _ = fut.result()
            self._note_liveness(c, ok)

    def _note_liveness(self, c: Contact, ok: bool) -> None:
        node = Node(c.id, c.host, c.port)
        if ok:
            self.proto.welcome_if_new(node)
        else:
            self.proto.mark_suspect((c.host, c.port))
            self.proto.router.remove_contact(node)

    def _handle_answer(
        self, lk: Lookup, c: Contact, result: tuple[bool, Any], bundles: list[bytes], fv: bool
    ) -> None:
        ok, data = result
        nodes_raw: object = data
        if ok and fv:
            if isinstance(data, dict):
                nodes_raw = data.get("nodes")
                value = data.get("values")
                if type(value) is bytes and len(bundles) < self.config.ksize * 2:
                    bundles.append(value)
            else:
                nodes_raw = None
        contacts = None
        if ok and isinstance(nodes_raw, list):
            contacts = [_contact_from_wire(item) for item in nodes_raw[: self.config.ksize]]
        if contacts is None or any(x is None for x in contacts):
            lk.on_failure(c)  # silence, or an answer we cannot use
            if not ok:
                self._note_liveness(c, False)
            return
        self._note_liveness(c, True)
        lk.on_answer(c, [x for x in contacts if x is not None])

    async def store_record(self, record: PeerRecord) -> int:
        """Store ``record`` at the k nodes closest to its key; returns how many accepted it."""
        key = record.topic.dht_key
        lk, _ = await self.crawl(key, find_value=False)
        nodes = lk.closest()
        bundle = encode_bundle([record])
        keynode = Node(key)
        if len(nodes) < self.config.ksize or self.node.distance_to(keynode) < max(
            Node(c.id).distance_to(keynode) for c in nodes
        ):
            self.storage.add_record(key, record)
        proto = self.proto
        results = await asyncio.gather(
            *(proto.store((c.host, c.port), self.node.id, key, bundle) for c in nodes)
        )
        return sum(1 for ok, answer in results if ok and answer is True)

    async def announce(self, topic: Topic, host: str, port: int) -> int:
        ann = self.announcements.setdefault(topic, _Announcement(host, port))
        ann.host, ann.port = host, port
        ann.record = make_record(
            self.key, topic, host, port, now=self.config.clock(), ttl=self.config.record_ttl
        )
        return await self.store_record(ann.record)

    async def reannounce_all(self) -> int:
        jobs = [self.announce(t, a.host, a.port) for t, a in list(self.announcements.items())]
        return sum(await asyncio.gather(*jobs))

    def withdraw(self, topic: Topic) -> None:
        self.announcements.pop(topic, None)

    async def lookup(self, topic: Topic) -> LookupResult:
        started = time.monotonic()
        key = topic.dht_key
        lk, bundles = await self.crawl(key, find_value=True)
        now = self.config.clock()
        best: dict[bytes, PeerRecord] = {}
        rejected = 0

        def offer(rec: PeerRecord) -> None:
            if rec.topic == topic and rec.is_fresh(now):
                old = best.get(rec.public_key)
                if old is None or rec.expires > old.expires:
                    best[rec.public_key] = rec

        for rec in self.storage.records(key):
            offer(rec)
        own = self.announcements.get(topic)
        if own is not None and own.record is not None:
            offer(own.record)
        seen: set[bytes] = {r.encoded for r in best.values()}
        for bundle in bundles:
            try:
                items = decode_bundle(bundle)
            except PeerRecordError:
                rejected += 1
                continue
            for raw in items:
                if raw in seen or len(seen) >= MAX_LOOKUP_RECORDS:
                    continue
                seen.add(raw)
                try:
                    offer(parse_record(raw, now=now))
                except PeerRecordError:
                    rejected += 1
        records = sorted(best.values(), key=lambda r: r.expires, reverse=True)
        return LookupResult(
            records[:MAX_LOOKUP_RECORDS],
            queries=lk.queries_sent,
            answers=lk.answers,
            failures=lk.failures,
            seconds=time.monotonic() - started,
            rejected=rejected,
        )


# -- bridges --------------------------------------------------------------------------------


class TrioAsyncioBridge:
    """Runs asyncio code on a trio-asyncio loop living in trio's own thread."""

    name = "trio-asyncio"

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        import trio_asyncio

        return await trio_asyncio.aio_as_trio(fn)(*args)


class ThreadBridge:
    """Runs asyncio code on a plain asyncio loop in a dedicated daemon thread.

    Results come back through ``TrioToken.run_sync_soon``, so no trio worker thread is held
    while a call is pending; cancelling the trio side cancels the asyncio task.
    """

    name = "thread"

    def __init__(self) -> None:
        # not asyncio.new_event_loop(): once trio-asyncio is imported its policy refuses to make
        # a loop from inside trio, and this loop is not trio's anyway
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="p2pnode-dht-asyncio", daemon=True
        )
        self._thread.start()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        async def run() -> T:
            return await fn(*args)

        cfut = asyncio.run_coroutine_threadsafe(run(), self.loop)

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        cfut.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            cfut.cancel()
            raise
        return cfut.result()

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        self.loop.close()


Bridge = TrioAsyncioBridge | ThreadBridge

#: Chosen by measurement: see docs/discovery.md ("Bridge").
DEFAULT_BRIDGE = "thread"


@contextlib.asynccontextmanager
async def open_bridge(kind: str = DEFAULT_BRIDGE) -> AsyncIterator[Bridge]:
    """Open a bridge from trio to asyncio: ``"thread"`` or ``"trio-asyncio"``."""
    if kind == "trio-asyncio":
        import trio_asyncio

        async with trio_asyncio.open_loop() as loop:
            yield TrioAsyncioBridge(loop)
    elif kind == "thread":
        bridge = ThreadBridge()
        try:
            yield bridge
        finally:
            # Shielded: the bridge is usually closed because its owner was cancelled, and an
            # unshielded await would be cancelled at once, leaving the loop's thread running.
            # close() is bounded (it joins the thread for at most 5 s).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(bridge.close)
    else:
        raise UsageError(f"unknown DHT bridge {kind!r}", fix="use 'thread' or 'trio-asyncio'")


# -- trio side ------------------------------------------------------------------------------


@dataclass
class DHTNode:
    """A running DHT node, as seen from trio. Make one with ``open_dht_node``."""

    key: Ed25519PrivateKey
    config: DHTConfig
    bridge: Bridge
    core: _AioCore
    port: int = 0
    last_save_error: str | None = field(default=None, repr=False)

    @property
    def node_id(self) -> bytes:
        return bytes(self.core.node.id)

    @property
    def storage(self) -> RecordStorage:
        """The node's record storage. It lives on the asyncio loop: with the thread bridge,
        read or change it only inside ``on_loop``."""
        return self.core.storage

    @property
    def protocol(self) -> DHTProtocol:
        """The node's protocol (counters, routing table); same rule as ``storage``."""
        return self.core.proto

    async def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the plain function ``fn(*args)`` on the DHT's asyncio loop and return its result:
        the safe way to inspect or change ``storage`` and ``protocol`` from trio."""

        async def run() -> T:
            return fn(*args)

        return await self.bridge.call(run)

    async def _resolve(self, addrs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        out = []
        for host, port in addrs:
            try:
                ipaddress.ip_address(host)
                out.append((host, port))
                continue
            except ValueError:
                pass
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("cannot resolve DHT bootstrap %s: %s", host, exc)
                continue
            out.extend((str(info[4][0]), port) for info in infos[:1])
        return out

    async def bootstrap(self, addrs: Iterable[tuple[str, int]]) -> int:
        """Join the DHT through ``addrs``; returns how many nodes the routing table holds."""
        resolved = await self._resolve(addrs)
        if not resolved:
            return len(await self.contacts())
        return await self.bridge.call(self.core.bootstrap, resolved)

    async def contacts(self) -> list[Contact]:
        return await self.on_loop(self.core.contacts)

    async def announce(self, topic: Topic, host: str, port: int) -> int:
        """Announce that this node serves ``topic`` at ``host:port`` and keep doing so
        (``serve_dht`` re-announces). Returns how many DHT nodes stored the record.

        Raises:
            PeerRecordError: ``host`` is not an IP address or ``port`` is out of range.
        """
        return await self.bridge.call(self.core.announce, topic, host, port)

    async def withdraw(self, topic: Topic) -> None:
        """Stop re-announcing ``topic`` (stored copies expire by themselves)."""
        await self.on_loop(self.core.withdraw, topic)

    async def reannounce(self) -> int:
        return await self.bridge.call(self.core.reannounce_all)

    async def lookup(self, topic: Topic) -> list[PeerRecord]:
        """Verified, unexpired records of the nodes serving ``topic`` (ours included)."""
        return (await self.lookup_detailed(topic)).records

    async def lookup_detailed(self, topic: Topic) -> LookupResult:
        return await self.bridge.call(self.core.lookup, topic)

    async def refresh(self) -> None:
        await self.bridge.call(self.core.refresh)

    async def save_state(self, path: Path | None = None) -> bool:
        """Save the routing table as JSON; returns False (and logs) when it cannot."""
        path = path or self.config.state_path
        if path is None:
            return False
        contacts = await self.contacts()
        if not contacts:
            return False  # keep an older, useful file rather than an empty one
        try:
            await trio.to_thread.run_sync(save_routing_table, path, self.node_id, contacts)
        except OSError as exc:
            self.last_save_error = f"{path}: {exc.strerror}"
            log.warning("cannot save DHT routing table %s: %s", path, exc.strerror)
            return False
        return True

    async def run_maintenance(self) -> None:
        """Re-announce, refresh and save on the configured intervals, forever."""
        cfg = self.config
        next_announce = trio.current_time() + cfg.reannounce_interval
        next_refresh = trio.current_time() + cfg.refresh_interval
        next_save = trio.current_time() + cfg.save_interval
        while True:
            await trio.sleep_until(min(next_announce, next_refresh, next_save))
            now = trio.current_time()
            if now >= next_announce:
                await self.reannounce()
                next_announce = now + cfg.reannounce_interval
            if now >= next_refresh:
                await self.refresh()
                next_refresh = now + cfg.refresh_interval
            if now >= next_save:
                await self.save_state()
                next_save = now + cfg.save_interval


@contextlib.asynccontextmanager
async def open_dht_node(
    key: Ed25519PrivateKey,
    config: DHTConfig,
    bridge: Bridge,
    *,
    storage: RecordStorage | None = None,
) -> AsyncIterator[DHTNode]:
    """Start a DHT node on ``bridge``, bootstrap it from its saved routing table and
    ``config.bootstrap``, and stop it (saving the routing table) on exit.

    Raises:
        DHTError: the UDP port cannot be bound.
    """
    core = _AioCore(key, config, storage or RecordStorage())
    node = DHTNode(key, config, bridge, core)
    node.port = await bridge.call(core.start)
    try:
        seeds = list(config.bootstrap)
        if config.state_path is not None and Path(config.state_path).exists():
            try:
                saved = await trio.to_thread.run_sync(load_routing_table, config.state_path)
            except DHTStateError as exc:
                log.warning("%s", exc)
            else:
                seeds.extend((c.host, c.port) for c in saved)
        if seeds:
            await node.bootstrap(seeds)
        yield node
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await node.save_state()

            async def stop() -> None:
                core.stop()

            await bridge.call(stop)


async def serve_dht(
    key: Ed25519PrivateKey,
    config: DHTConfig,
    bridge: Bridge,
    *,
    task_status: trio.TaskStatus[DHTNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a DHT node with its maintenance jobs until cancelled; ``started(node)`` once it
    listens and has bootstrapped."""
    async with open_dht_node(key, config, bridge) as node:
        task_status.started(node)
        await node.run_maintenance()
