"""``_AioCore``: the asyncio side of a DHT node. Lookups driven by the sans-IO ``Lookup``,
announces to the k closest nodes, and merged, verified, expiry-checked results (see node.py's
theory of operation)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kademlia.node import Node

from ...release.keys import node_id_of, public_key_bytes
from .config import DHTConfig, DHTError, contact_from_wire
from .lookup import Contact, Lookup, RttEstimator
from .protocol import DHTProtocol
from .records import (
    PeerRecord,
    PeerRecordError,
    Topic,
    decode_bundle,
    encode_bundle,
    make_record,
    parse_record,
)
from .storage import RecordStorage

__all__ = ["LookupResult"]

log = logging.getLogger(__name__)


#: Most records a lookup returns, and most distinct encodings it will verify.
MAX_LOOKUP_RECORDS = 256


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
            contacts = [contact_from_wire(item) for item in nodes_raw[: self.config.ksize]]
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
