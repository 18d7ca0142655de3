"""Whom we upload to: a bounded set of upload slots and an optimistic unchoke, sans-IO.

Theory of operation
-------------------
Uploading to every peer at once splits a node's uplink into slivers too thin for TCP to use well
and gives nothing back to the peers that give to us. As in BitTorrent, a node serves at most
``slots`` peers at a time (*unchoked*); the others are *choked* and their requests are rejected
with reason ``choked`` (the fetcher then asks someone else; it does not mark the chunk missing).

* **Regular slots** (``slots - 1``) go, every ``rechoke_interval`` seconds, to the interested
  peers ranked by what they give us (reciprocation: the download rate we measure from them),
  then by what we give them. A node that downloads nothing (a seed) ranks by its upload rate to
  each peer: the fastest downloaders spread the data furthest.
* **One optimistic slot** rotates every ``optimistic_interval`` seconds to a random choked
  interested peer, new peers weighted ``NEW_PEER_WEIGHT`` times: that is how a newcomer with
  nothing to trade gets its first chunks, and how a node discovers peers faster than its
  current partners.
* **Interest** is having joined one of our swarms and asked for something within
  ``INTEREST_TIMEOUT`` (or having just joined). A peer that stops asking frees its slot.
* Between rechokes a newly interested peer is unchoked at once while a slot is free, so a
  swarm smaller than the slot count never waits for a tick.
* **Frugal seeding** (``frugal``, an origin's choice): while some chunk of a swarm has never
  been uploaded, a chunk already uploaded once is refused (``frugal_refuses``; the shell counts
  each upload with ``sent``). The refused leecher takes it from the peer that got it (its
  ``have`` says so), so the origin's upload goes to chunks the swarm lacks.

Peers are keyed by node id (proven by TLS), so the download a peer gives us on our outbound
connection counts for the upload slot of its inbound one. The shell (``serving.py``) calls
:meth:`tick` at :meth:`next_tick` and sends the returned choke/unchoke messages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .ratemeter import RateMeter

__all__ = ["Choker", "Decision"]

RECHOKE_INTERVAL = 10.0
OPTIMISTIC_INTERVAL = 30.0
INTEREST_TIMEOUT = 30.0
NEW_PEER_SECONDS = 60.0
NEW_PEER_WEIGHT = 3
#: Enough for a swarm's first wave: every leecher of an 8-node swarm is served by the origin.
DEFAULT_SLOTS = 8
#: Download meters of peers not connected to our server, kept for reciprocation.
MAX_REMEMBERED = 256

Decision = tuple[bytes, bool]  # (node id, unchoke?)


@dataclass
class _Peer:
    joined: float
    last_request: float
    unchoked: bool = False
    up: RateMeter = field(default_factory=lambda: RateMeter(window=20.0))
    down: RateMeter = field(default_factory=lambda: RateMeter(window=20.0))


class Choker:
    def __init__(
        self,
        slots: int = DEFAULT_SLOTS,
        *,
        rechoke_interval: float = RECHOKE_INTERVAL,
        optimistic_interval: float = OPTIMISTIC_INTERVAL,
        rng: random.Random | None = None,
        frugal: bool = False,
    ) -> None:
        if slots < 1:
            raise ValueError("a node needs at least one upload slot")
        self.slots = slots
        self.rechoke_interval = rechoke_interval
        self.optimistic_interval = optimistic_interval
        self.peers: dict[bytes, _Peer] = {}
        self.optimistic: bytes | None = None
        self._rng = rng or random.Random()
        self._next_rechoke = 0.0
        self._next_optimistic = 0.0
        self._down_meters: dict[bytes, RateMeter] = {}  # kept across reconnects
        self.frugal = frugal
        self._sent: dict[bytes, list[int]] = {}  # manifest id -> uploads per chunk index
        self._unsent: dict[bytes, int] = {}  # manifest id -> chunks never uploaded

    # -- events -----------------------------------------------------------------------------

    def interested(self, peer: bytes, now: float) -> list[Decision]:
        """``peer`` joined a swarm of ours or asked for a chunk. Returns an unchoke when a
        slot is free (at once, not at the next tick)."""
        p = self.peers.get(peer)
        if p is None:
            p = self.peers[peer] = _Peer(joined=now, last_request=now)
            p.down = self._down_meters.setdefault(peer, RateMeter(window=20.0))
        p.last_request = now
        if not p.unchoked and self._unchoked_count() < self.slots:
            p.unchoked = True
            return [(peer, True)]
        return []

    def gone(self, peer: bytes, now: float) -> list[Decision]:
        """``peer``'s last connection closed: its slot goes to the best choked peer."""
        p = self.peers.pop(peer, None)
        if self.optimistic == peer:
            self.optimistic = None
        if p is None or not p.unchoked:
            return []
        waiting = [
            n
            for n, q in self.peers.items()
            if not q.unchoked and now - q.last_request <= INTEREST_TIMEOUT
        ]
        if not waiting:
            return []
        best = max(waiting, key=lambda n: self._rank(n, now, self._leeching(now)))
        self.peers[best].unchoked = True
        return [(best, True)]

    def uploaded(self, peer: bytes, nbytes: int, now: float) -> None:
        p = self.peers.get(peer)
        if p is not None:
            p.up.add(nbytes, now)

    def downloaded(self, peer: bytes, nbytes: int, now: float) -> None:
        if peer not in self._down_meters and len(self._down_meters) >= MAX_REMEMBERED:
            for node in [n for n, m in self._down_meters.items() if n not in self.peers]:
                if self._down_meters[node].rate(now) == 0:
                    del self._down_meters[node]  # forgotten: it gave nothing lately
        self._down_meters.setdefault(peer, RateMeter(window=20.0)).add(nbytes, now)

    def frugal_refuses(self, manifest: bytes, index: int, chunks: int) -> bool:
        """Frugal seeding: refuse chunk ``index`` of ``manifest`` (of ``chunks`` unique
        chunks), because it was uploaded already while another never was."""
        if not self.frugal:
            return False
        counts = self._sent.setdefault(manifest, [0] * chunks)
        return counts[index] > 0 and self._unsent.get(manifest, len(counts)) > 0

    def sent(self, manifest: bytes, index: int, chunks: int) -> None:
        """Chunk ``index`` of ``manifest`` (of ``chunks`` unique chunks) is being uploaded."""
        if self.frugal:
            counts = self._sent.setdefault(manifest, [0] * chunks)
            if counts[index] == 0:
                self._unsent[manifest] = self._unsent.get(manifest, len(counts)) - 1
            counts[index] += 1

    def is_unchoked(self, peer: bytes) -> bool:
        p = self.peers.get(peer)
        return p is not None and p.unchoked

    # -- time -------------------------------------------------------------------------------

    def next_tick(self) -> float:
        if self.optimistic is None:  # no turn to end; the next rechoke may start one
            return self._next_rechoke
        return min(self._next_rechoke, self._next_optimistic)

    def tick(self, now: float) -> list[Decision]:
        """Rechoke if due; returns the changes to send."""
        if now < self.next_tick():
            return []
        rotate = self.optimistic is not None and now >= self._next_optimistic
        self._next_rechoke = now + self.rechoke_interval
        keep = self._choose(now, rotate)
        changes: list[Decision] = []
        for node, p in self.peers.items():
            want = node in keep
            if want != p.unchoked:
                p.unchoked = want
                changes.append((node, want))
        return changes

    def _choose(self, now: float, rotate: bool = False) -> set[bytes]:
        active = {n: p for n, p in self.peers.items() if now - p.last_request <= INTEREST_TIMEOUT}
        if len(active) <= self.slots:
            return set(active)
        leeching = self._leeching(now)
        previous = self.optimistic if self.optimistic in active else None
        regular = sorted(
            (n for n in active if n != previous),
            key=lambda n: self._rank(n, now, leeching),
            reverse=True,
        )[: self.slots - 1]
        if rotate or previous is None:
            others = [n for n in active if n not in regular and n != previous]
            held = [n for n in others if self.peers[n].unchoked]
            if not rotate and held:
                # Unchoked at once while a slot was free: that is its optimistic turn, which
                # runs a full interval (taking it back at the first tick would waste it).
                self.optimistic = held[0]
            else:
                self.optimistic = self._pick_optimistic(
                    others or ([previous] if previous else []), now
                )
            self._next_optimistic = now + self.optimistic_interval
        chosen = set(regular)
        if self.optimistic is not None:
            chosen.add(self.optimistic)
        return chosen

    def _leeching(self, now: float) -> bool:
        """Are we downloading from anyone (then reciprocate), or only seeding?"""
        return any(m.rate(now) > 0 for m in self._down_meters.values())

    def _rank(self, node: bytes, now: float, leeching: bool) -> tuple[float, float]:
        p = self.peers[node]
        if leeching:
            return (p.down.rate(now), p.up.rate(now))
        return (p.up.rate(now), 0.0)

    def _pick_optimistic(self, choked: list[bytes], now: float) -> bytes | None:
        if not choked:
            return None
        weights = [
            NEW_PEER_WEIGHT if now - self.peers[n].joined < NEW_PEER_SECONDS else 1 for n in choked
        ]
        return self._rng.choices(choked, weights)[0]

    def _unchoked_count(self) -> int:
        return sum(1 for p in self.peers.values() if p.unchoked)
