"""DHT peer records attached to announces, verified once per announcer and bytes."""

from __future__ import annotations

from collections import OrderedDict

import blake3

from p2pnode.discovery.dht.records import Topic, encode_bundle, parse_record
from p2pnode.errors import P2PNodeError

from .core import Announce
from .errors import BadRequest, Forbidden

__all__ = ["VerifiedRecords"]


class VerifiedRecords:
    """The DHT peer records nodes attach, verified once: a node re-sends the same records on
    every announce until they are half expired, and each costs an Ed25519 check (~150 us), so
    a bounded LRU of what was verified (keyed by announcer, build, app and the exact bytes)
    spares the repeats. An entry lives no longer than its records."""

    MAX = 65_536

    def __init__(self) -> None:
        self._ok: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self.checked = 0

    def check(self, a: Announce, now: float) -> bytes:
        """Verify the records ``a`` carries, so the tracker relays only what the node itself
        signed for this app or manifest (clients re-verify; see docs/discovery.md); returns
        them as a bundle."""
        parts = (a.public_key, a.manifest, a.app.encode(), *a.records)
        key = blake3.blake3(b"".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()
        hit = self._ok.get(key)
        if hit is not None and hit[0] > now:
            self._ok.move_to_end(key)
            return hit[1]
        good = []
        wanted = {Topic.manifest(a.manifest), Topic.app(a.app)}
        for raw in a.records:
            try:
                rec = parse_record(raw, now=now)
            except P2PNodeError as exc:
                raise BadRequest(f"attached peer record refused: {exc.message}") from exc
            if rec.public_key != a.public_key or rec.topic not in wanted:
                raise Forbidden("attached peer records must be the announcer's, for this app/build")
            good.append(rec)
        self.checked += 1
        bundle = encode_bundle(good)
        self._ok[key] = (min(r.expires for r in good), bundle)
        if len(self._ok) > self.MAX:
            self._ok.popitem(last=False)
        return bundle
