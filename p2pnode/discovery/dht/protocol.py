"""``DHTProtocol``: the ``kademlia`` package's UDP/msgpack RPCs, hardened (see node.py's
theory of operation): every datagram handled synchronously after a size check and a
per-address token bucket, malformed requests dropped unanswered, STORE merged into the
verified, bounded ``RecordStorage``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from .records import MAX_BUNDLE_BYTES
from .storage import RecordStorage

__all__ = ["DHTProtocol"]

log = logging.getLogger(__name__)


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
