"""Peers on the same LAN, found by UDP multicast.

Theory of operation
-------------------
A node that serves releases joins a multicast group (``LAN_GROUP:LAN_PORT``, organisation-local
scope, TTL 1 so it never leaves the link) and answers *queries*. A node looking for peers sends
one query naming the DHT keys it wants (the manifest's and the app's topic keys, records.py) with
a random nonce, and collects the answers that arrive, unicast, within a short window. Answers
carry the same signed peer records as the DHT, in a bundle, so everything learnt on the LAN is
verified exactly like everything learnt from the DHT: a LAN neighbour can lie about nothing but
its own address.

Hostile input: messages are canonical bencode with strict shapes and size limits; answers must
echo the nonce of a query we sent; records must be about a topic we asked for. The responder
answers only sources with private, loopback or link-local addresses (a spoofed public source
cannot turn us into a reflector), at most ``MAX_KEYS_PER_QUERY`` keys per query, under a
per-source token bucket, and never more than one bundle per query.

The codec functions are sans-IO; ``LANDiscovery`` is the trio shell (a ``PeerSource``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...errors import LANMessageError, ManifestError, TransportError
from ...release import canonical
from ...release.keys import public_key_bytes
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

__all__ = [
    "LAN_GROUP",
    "LAN_PORT",
    "LANDiscovery",
    "LANMessageError",
    "encode_answer",
    "encode_query",
    "parse_answer",
    "parse_query",
]

#: Organisation-local scope (RFC 2365), next to BitTorrent's local service discovery group.
LAN_GROUP = "239.192.80.78"
LAN_PORT = 47821
MAGIC = b"p2pnode-lan-v1"
MAX_KEYS_PER_QUERY = 4
MAX_QUERY_BYTES = 256
MAX_ANSWER_BYTES = MAX_BUNDLE_BYTES + 64
NONCE_BYTES = 16


def encode_query(keys: Iterable[bytes], nonce: bytes) -> bytes:
    return canonical.encode({b"k": list(keys)[:MAX_KEYS_PER_QUERY], b"n": nonce, b"q": MAGIC})


def _decode(data: bytes, max_size: int) -> dict[bytes, Any]:
    try:
        doc = canonical.decode(data, what="LAN message", max_size=max_size)
    except ManifestError as exc:
        raise LANMessageError(exc.message) from exc
    if type(doc) is not dict:
        raise LANMessageError("LAN message is not a dictionary")
    return doc


def parse_query(data: bytes) -> tuple[list[bytes], bytes]:
    """Return (DHT keys, nonce) of a query.

    Raises:
        LANMessageError: anything but a well-formed query.
    """
    doc = _decode(data, MAX_QUERY_BYTES)
    if set(doc) != {b"k", b"n", b"q"} or doc[b"q"] != MAGIC:
        raise LANMessageError("not a p2pnode LAN query")
    keys, nonce = doc[b"k"], doc[b"n"]
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise LANMessageError("LAN query nonce is malformed")
    if type(keys) is not list or not 1 <= len(keys) <= MAX_KEYS_PER_QUERY:
        raise LANMessageError("LAN query names no keys, or too many")
    if not all(type(k) is bytes and len(k) == 20 for k in keys):
        raise LANMessageError("LAN query keys are not 20-byte DHT keys")
    return keys, nonce


def encode_answer(nonce: bytes, records: Iterable[PeerRecord]) -> bytes:
    return canonical.encode({b"a": encode_bundle(records), b"n": nonce})


def parse_answer(
    data: bytes, nonce: bytes, wanted: set[bytes], *, now: float
) -> tuple[list[PeerRecord], int]:
    """Verified records of an answer to our query ``nonce`` about ``wanted`` keys, and the
    number of records dropped.

    Raises:
        LANMessageError: not an answer, or an answer to some other query.
    """
    doc = _decode(data, MAX_ANSWER_BYTES)
    if set(doc) != {b"a", b"n"} or doc[b"n"] != nonce:
        raise LANMessageError("not an answer to our LAN query")
    out, dropped = [], 0
    for raw in decode_bundle(doc[b"a"]):
        try:
            rec = parse_record(raw, now=now)
        except PeerRecordError:
            dropped += 1
            continue
        if rec.topic.dht_key in wanted:
            out.append(rec)
        else:
            dropped += 1
    return out, dropped


def _local_source(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local


@dataclass
class _Own:
    host: str
    port: int
    record: PeerRecord


class LANDiscovery:
    """Announce to, and find peers on, the local network (a ``PeerSource``).

    Args:
        key: this node's key; its records are signed with it.
        interface: IPv4 address of the interface to use (``0.0.0.0``: the default route's).
        group, port: the multicast group and port.
        wait: seconds ``find_peers`` collects answers for.
        record_ttl: lifetime of the records handed out (re-signed when half of it has passed).
    """

    name = "lan"

    def __init__(
        self,
        key: Ed25519PrivateKey,
        *,
        interface: str = "0.0.0.0",
        group: str = LAN_GROUP,
        port: int = LAN_PORT,
        wait: float = 0.25,
        record_ttl: float = 1800,
    ) -> None:
        if not 0 < record_ttl <= MAX_TTL:
            raise PeerRecordError(f"record ttl {record_ttl} s is not in (0, {MAX_TTL}]")
        self.key = key
        self.public = public_key_bytes(key)
        self.interface = interface
        self.group = group
        self.port = port
        self.wait = wait
        self.record_ttl = record_ttl
        self._own: dict[bytes, dict[Topic, _Own]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self.answered = 0
        self.dropped = 0

    # -- what we serve ------------------------------------------------------------------

    def announce(self, topic: Topic, host: str, port: int) -> None:
        """Serve ``topic`` at ``host:port`` to LAN queries until ``withdraw``."""
        rec = make_record(self.key, topic, host, port, now=time.time(), ttl=self.record_ttl)
        self._own.setdefault(topic.dht_key, {})[topic] = _Own(host, port, rec)

    def withdraw(self, topic: Topic) -> None:
        slot = self._own.get(topic.dht_key, {})
        slot.pop(topic, None)
        if not slot:
            self._own.pop(topic.dht_key, None)

    def _records_for(self, key: bytes, now: float) -> list[PeerRecord]:
        out = []
        for topic, own in self._own.get(key, {}).items():
            if own.record.expires - now < self.record_ttl / 2:
                own.record = make_record(
                    self.key, topic, own.host, own.port, now=now, ttl=self.record_ttl
                )
            out.append(own.record)
        return out

    def _allow(self, host: str, now: float) -> bool:
        tokens, last = self._buckets.pop(host, (20.0, now))
        tokens = min(20.0, tokens + (now - last) * 10.0)
        self._buckets[host] = (tokens - 1 if tokens >= 1 else tokens, now)
        if len(self._buckets) > 1024:
            self._buckets.pop(next(iter(self._buckets)))
        return tokens >= 1

    def handle_query(self, data: bytes, source_host: str, now: float) -> bytes | None:
        """The answer to send back to a query datagram, or None (sans-IO core of ``serve``)."""
        if not _local_source(source_host) or not self._allow(source_host, now):
            self.dropped += 1
            return None
        try:
            keys, nonce = parse_query(data)
        except LANMessageError:
            self.dropped += 1
            return None
        records = [r for k in keys for r in self._records_for(k, now)]
        if not records:
            return None
        self.answered += 1
        return encode_answer(nonce, records)

    def _group_socket(self) -> tuple[trio.socket.SocketType, bytes]:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        mreq = struct.pack("4s4s", socket.inet_aton(self.group), socket.inet_aton(self.interface))
        return sock, mreq

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer LAN queries until cancelled.

        Raises:
            TransportError: the group cannot be joined (no multicast route, port refused).
        """
        sock, mreq = self._group_socket()
        with sock:
            try:
                await sock.bind(("", self.port))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            except OSError as exc:
                raise TransportError(
                    f"cannot join LAN discovery group {self.group}:{self.port}: {exc.strerror}",
                    fix="LAN discovery is optional; disable it or pick another interface",
                ) from exc
            task_status.started()
            while True:
                data, addr = await sock.recvfrom(MAX_QUERY_BYTES + 1)
                answer = self.handle_query(data, addr[0], time.time())
                if answer is not None:
                    try:
                        await sock.sendto(answer, addr)
                    except OSError:
                        self.dropped += 1

    # -- what we ask --------------------------------------------------------------------

    async def find_peers(self, manifest_id: bytes, app: str) -> list[PeerRecord]:
        """Records from LAN neighbours that answer within ``wait`` seconds (ours left out)."""
        topics = [Topic.manifest(manifest_id), Topic.app(app)]
        wanted = {t.dht_key for t in topics}
        nonce = os.urandom(NONCE_BYTES)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        found: dict[tuple[bytes, bytes], PeerRecord] = {}
        with sock:
            try:
                sock.setsockopt(
                    socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.interface)
                )
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
                await sock.bind((self.interface, 0))
                await sock.sendto(
                    encode_query([t.dht_key for t in topics], nonce), (self.group, self.port)
                )
            except OSError as exc:
                raise TransportError(f"cannot send a LAN discovery query: {exc.strerror}") from exc
            with trio.move_on_after(self.wait):
                while True:
                    data, _ = await sock.recvfrom(MAX_ANSWER_BYTES + 1)
                    try:
                        records, dropped = parse_answer(data, nonce, wanted, now=time.time())
                    except (LANMessageError, PeerRecordError):
                        self.dropped += 1
                        continue
                    self.dropped += dropped
                    for rec in records:
                        if rec.public_key == self.public:
                            continue
                        mark = (rec.public_key, rec.topic.kind)
                        old = found.get(mark)
                        if old is None or rec.expires > old.expires:
                            found[mark] = rec
        # seeds of the manifest first, then partial seeds of the app
        return sorted(found.values(), key=lambda r: (r.topic.kind != b"m", -r.expires))
