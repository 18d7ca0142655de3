"""Bounded multi-value record storage for the DHT, pluggable into the ``kademlia`` package.

Theory of operation
-------------------
The ``kademlia`` package's storage maps one key to one value, and its STORE overwrites: the
second node to announce a release would erase the first. ``RecordStorage`` keeps, per DHT key,
one record per announcing node (the one with the latest expiry wins), so every announcer stays
findable. It implements the package's ``IStorage`` interface with these meanings:

* ``storage[key] = bundle`` *merges*: ``bundle`` is an encoded record bundle (records.py); each
  record in it is parsed, signature-checked, expiry-checked and checked to belong to ``key``
  (its topic must hash to ``key``) on its own. Anything else is dropped and counted in
  ``rejected``; nothing that is not a well-formed signed peer record is ever kept.
* ``storage.get(key)`` returns a bundle of the key's unexpired records (at most
  ``MAX_BUNDLE_RECORDS``, a random sample when there are more, so that different storing nodes
  hand out different subsets of a big swarm), or the default.
* iteration yields ``(key, bundle)`` pairs, which is what the package's replication to newly
  seen nodes sends.

Memory is bounded: at most ``max_per_key`` records per key and ``max_records`` in total, and at
most ``max_per_network`` records per key whose addresses share one network (an IPv4 /24 or an
IPv6 /48), so a host that makes a thousand keys (keys are free) still holds only a few of a
key's places: taking a key over takes addresses in many networks. Loopback, private and
link-local addresses are exempt (they only mean something inside one site). When a bound is
hit, the record that expires first makes room (if the newcomer outlives it), so a flood of
records can displace records only by being longer-lived, and ``MAX_TTL`` caps that. Expired
records are dropped lazily, through a heap ordered by expiry, so every operation stays
O(log n) amortised even under a flood.

The clock is injected (``clock``, Unix seconds) because records carry absolute expiry times.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import time
from collections.abc import Callable, Iterator

from kademlia.storage import IStorage

from .records import (
    MAX_BUNDLE_RECORDS,
    PeerRecord,
    PeerRecordError,
    decode_bundle,
    encode_bundle,
    parse_record,
)

__all__ = [
    "DEFAULT_MAX_PER_KEY",
    "DEFAULT_MAX_PER_NETWORK",
    "DEFAULT_MAX_RECORDS",
    "RecordStorage",
    "network_of",
]

#: Per-key bound: BitTorrent's DHT keeps a few dozen to a hundred peers per infohash; one
#: storing node only ever hands out ``MAX_BUNDLE_RECORDS`` at a time anyway.
DEFAULT_MAX_PER_KEY = 128
#: Total bound: about 2 MB of records (with dict overhead) per node.
DEFAULT_MAX_RECORDS = 8192
#: Records per key from one /24 (IPv4) or /48 (IPv6): a few hosts behind one NAT or in one
#: rack, not a Sybil army on one address.
DEFAULT_MAX_PER_NETWORK = 8


def network_of(host: str) -> str | None:
    """The network an address counts against for ``max_per_network``; None when exempt."""
    ip = ipaddress.ip_address(host)
    if ip.is_loopback or ip.is_private or ip.is_link_local:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class RecordStorage(IStorage):
    """Multi-value, verified, TTL'd and bounded storage of peer records, by DHT key.

    Args:
        max_per_key: most records kept under one key.
        max_records: most records kept in total.
        max_per_network: most records kept under one key with addresses in one network.
        clock: returns the current Unix time; records expire against it.
        rng: picks the sample handed out when a key holds more than one bundle's worth.
    """

    def __init__(
        self,
        *,
        max_per_key: int = DEFAULT_MAX_PER_KEY,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_per_network: int = DEFAULT_MAX_PER_NETWORK,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.max_per_key = max_per_key
        self.max_records = max_records
        self.max_per_network = max_per_network
        self.clock = clock
        self.rng = rng or random.Random()
        # key -> announcer public key -> record
        self._data: dict[bytes, dict[bytes, PeerRecord]] = {}
        # (expires, key, public key) for every kept record, plus stale entries skipped lazily
        self._heap: list[tuple[int, bytes, bytes]] = []
        self._stored_at: dict[bytes, float] = {}
        # encodings of every kept record: replicas arriving again skip signature checks
        self._encoded: set[bytes] = set()
        self._count = 0
        self.accepted = 0
        self.rejected = 0

    # -- our own API ------------------------------------------------------------------------

    def __len__(self) -> int:
        self._expire()
        return self._count

    @property
    def key_count(self) -> int:
        self._expire()
        return len(self._data)

    def records(self, key: bytes) -> list[PeerRecord]:
        """All unexpired records under ``key``, latest expiry first."""
        self._expire()
        recs = list(self._data.get(key, {}).values())
        recs.sort(key=lambda r: r.expires, reverse=True)
        return recs

    def add_record(self, key: bytes, record: PeerRecord) -> bool:
        """Keep an already verified ``record`` under ``key``; returns whether it was kept."""
        now = self.clock()
        if record.topic.dht_key != key or not record.is_fresh(now):
            self.rejected += 1
            return False
        self._expire()
        slot = self._data.get(key)
        old = slot.get(record.public_key) if slot is not None else None
        if old is not None:
            if old.expires >= record.expires:
                return old.encoded == record.encoded
            self._put(key, record, replacing=True)
            return True
        net = network_of(record.host)
        if slot is not None and net is not None:
            same = [r for r in slot.values() if network_of(r.host) == net]
            if len(same) >= self.max_per_network:
                victim = min(same, key=lambda r: r.expires)
                if victim.expires >= record.expires:
                    self.rejected += 1
                    return False
                self._remove(key, victim.public_key)
                slot = self._data.get(key)
        if slot is not None and len(slot) >= self.max_per_key:
            victim = min(slot.values(), key=lambda r: r.expires)
            if victim.expires >= record.expires:
                self.rejected += 1
                return False
            self._remove(key, victim.public_key)
        if self._count >= self.max_records and not self._evict_one(record.expires):
            self.rejected += 1
            return False
        self._put(key, record, replacing=False)
        return True

    def add_bundle(self, key: bytes, bundle: object) -> int:
        """Verify and merge every record of ``bundle`` under ``key``; returns how many of its
        records are now held (newly kept, or already held byte for byte)."""
        try:
            items = decode_bundle(bundle)
        except PeerRecordError:
            self.rejected += 1
            return 0
        now = self.clock()
        kept = held = 0
        for raw in items:
            if self._lookup_encoded(key, raw):
                held += 1  # a replica of what we hold: no need to verify it again
                continue
            try:
                record = parse_record(raw, now=now)
            except PeerRecordError:
                self.rejected += 1
                continue
            if self.add_record(key, record):
                kept += 1
        self.accepted += kept
        return kept + held

    # -- kademlia's IStorage ----------------------------------------------------------------

    def __setitem__(self, key: bytes, value: object) -> None:
        self.add_bundle(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        recs = self.records(key)
        if not recs:
            return default
        if len(recs) > MAX_BUNDLE_RECORDS:
            recs = self.rng.sample(recs, MAX_BUNDLE_RECORDS)
        return encode_bundle(recs)

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        cutoff = self.clock() - seconds_old
        return [
            (key, bundle)
            for key, at in list(self._stored_at.items())
            if at <= cutoff and (bundle := self.get(key)) is not None
        ]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self._data):
            bundle = self.get(key)
            if bundle is not None:
                yield key, bundle

    # -- internals --------------------------------------------------------------------------

    def _lookup_encoded(self, key: bytes, raw: bytes) -> bool:
        return raw in self._encoded and key in self._data

    def _put(self, key: bytes, record: PeerRecord, *, replacing: bool) -> None:
        slot = self._data.setdefault(key, {})
        old = slot.get(record.public_key)
        if old is not None:
            self._encoded.discard(old.encoded)
        slot[record.public_key] = record
        self._encoded.add(record.encoded)
        if not replacing:
            self._count += 1
        self._stored_at[key] = self.clock()
        heapq.heappush(self._heap, (record.expires, key, record.public_key))
        if len(self._heap) > 2 * self._count + 64:
            self._rebuild_heap()

    def _remove(self, key: bytes, public: bytes) -> None:
        slot = self._data[key]
        self._encoded.discard(slot.pop(public).encoded)
        self._count -= 1
        if not slot:
            del self._data[key]
            self._stored_at.pop(key, None)

    def _rebuild_heap(self) -> None:
        self._heap = [(r.expires, k, p) for k, slot in self._data.items() for p, r in slot.items()]
        heapq.heapify(self._heap)

    def _pop_live(self) -> tuple[int, bytes, bytes] | None:
        """Discard stale heap entries; return the live entry that expires first, if any."""
        while self._heap:
            expires, key, public = self._heap[0]
            rec = self._data.get(key, {}).get(public)
            if rec is not None and rec.expires == expires:
                return self._heap[0]
            heapq.heappop(self._heap)
        return None

    def _expire(self) -> None:
        now = self.clock()
        while (head := self._pop_live()) is not None and head[0] <= now:
            heapq.heappop(self._heap)
            self._remove(head[1], head[2])

    def _evict_one(self, newcomer_expires: int) -> bool:
        head = self._pop_live()
        if head is None or head[0] >= newcomer_expires:
            return False
        heapq.heappop(self._heap)
        self._remove(head[1], head[2])
        return True
