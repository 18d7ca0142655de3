"""The iterative Kademlia lookup as a sans-IO state machine.

Theory of operation
-------------------
The ``kademlia`` package's crawlers query ``alpha`` nodes, wait for *all* of them (each up to the
RPC timeout), then start the next round, and its value crawler stops at the first node holding
any value. Both are wrong for peer discovery: one dead node stalls a whole round, and stopping
at the first value loses every announcer stored elsewhere. This module keeps the lookup's state
and decides what to ask next; the asyncio driver in node.py only sends and receives.

A ``Lookup`` holds a shortlist of contacts sorted by XOR distance to the target. At any time at
most ``alpha`` queries are in flight; a new one starts as soon as any finishes (so a dead node
costs one slot for one timeout, not a round). The lookup is done when nothing is in flight and
the ``k`` closest contacts not known to have failed have all answered. Answers add contacts;
failures remove them from the running. A query that has not been answered within a short
"stall" time (well under the RPC timeout) stops counting against ``alpha`` and stops holding the
lookup open, so a dead node among the closest costs a fraction of a second, not a full timeout
(libtorrent's DHT does the same); if its answer still arrives, it is used. The shortlist is
bounded (``k * SHORTLIST_FACTOR`` closest kept) so a hostile answer cannot grow it without
limit, and each answer contributes at most ``k`` contacts.

A lying node can answer with made-up contacts close to the target that never respond, so that
the lookup spends its time on stalls. Each contact remembers who referred it first; once
``DISTRUST_AFTER`` of a referrer's referrals have stalled or failed while none of them has
answered, the referrer is distrusted: its other referrals are dropped unless another node
vouched for them too, and its later answers add nothing. (An honest node whose table holds
some dead nodes is almost never caught: with 30% of the network dead, its first three referrals
asked are all dead about 3% of the time, and what it referred is usually vouched for by others.)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = ["SHORTLIST_FACTOR", "Contact", "Lookup"]

SHORTLIST_FACTOR = 4
DISTRUST_AFTER = 3


class Contact(NamedTuple):
    """A DHT node: 20-byte id and UDP address."""

    id: bytes
    host: str
    port: int

    @property
    def long_id(self) -> int:
        return int.from_bytes(self.id, "big")


_NEW, _ASKED, _STALLED, _ANSWERED, _FAILED = range(5)
_OUT_OF_RUNNING = (_STALLED, _FAILED)


class Lookup:
    """State of one iterative lookup for ``target``.

    Args:
        target: the 20-byte id (node id or DHT key) looked for.
        seeds: contacts from our own routing table to start from.
        k: how many closest nodes must answer before the lookup is done.
        alpha: most queries in flight at once.
        self_id: our own id, never queried.
        skip: contacts for which this returns True are known but never queried (nodes that
            recently failed to answer us: re-asking them would only cost another stall).
    """

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        k: int,
        alpha: int,
        self_id: bytes | None = None,
        skip: Callable[[Contact], bool] | None = None,
    ) -> None:
        self.skip = skip
        self.target = int.from_bytes(target, "big")
        self.k = k
        self.alpha = alpha
        self.self_id = self_id
        self._sorted: list[tuple[int, bytes]] = []  # (distance, id), ascending
        self._contacts: dict[bytes, Contact] = {}
        self._state: dict[bytes, int] = {}
        self.in_flight = 0  # asked and not stalled
        self.stalled = 0
        self.queries_sent = 0
        self.answers = 0
        self.failures = 0
        self._referrer: dict[bytes, bytes] = {}
        self._vouched: set[bytes] = set()
        self._ref_good: dict[bytes, int] = {}
        self._ref_bad: dict[bytes, int] = {}
        self._answers_via: dict[bytes | None, int] = {}  # answers, by who referred the answerer
        self.distrusted: set[bytes] = set()
        self._add(seeds)

    def _add(self, contacts: Iterable[Contact], referrer: bytes | None = None) -> None:
        limit = self.k * SHORTLIST_FACTOR
        for c in contacts:
            if c.id == self.self_id:
                continue
            if c.id in self._contacts:
                if referrer is not None and self._referrer.get(c.id) not in (None, referrer):
                    self._vouched.add(c.id)
                continue
            entry = (c.long_id ^ self.target, c.id)
            if len(self._sorted) >= limit:
                if entry >= self._sorted[-1]:
                    continue
                # drop the farthest contact that is not in flight
                for i in range(len(self._sorted) - 1, -1, -1):
                    victim = self._sorted[i][1]
                    if self._state[victim] not in (_ASKED, _STALLED):
                        del self._sorted[i]
                        del self._contacts[victim]
                        del self._state[victim]
                        self._referrer.pop(victim, None)
                        break
                else:
                    continue
            bisect.insort(self._sorted, entry)
            self._contacts[c.id] = c
            if referrer is not None:
                self._referrer[c.id] = referrer
            self._state[c.id] = _FAILED if self.skip is not None and self.skip(c) else _NEW

    def _live_closest(self) -> list[bytes]:
        """The ids of the k closest contacts that have neither failed nor stalled."""
        out = []
        for _, cid in self._sorted:
            if self._state[cid] not in _OUT_OF_RUNNING and cid not in self.distrusted:
                out.append(cid)
                if len(out) == self.k:
                    break
        return out

    def next_queries(self) -> list[Contact]:
        """Contacts to query now; they count as in flight until answered or failed."""
        out = []
        for cid in self._live_closest():
            if self.in_flight >= self.alpha:
                break
            if self._state[cid] == _NEW:
                self._state[cid] = _ASKED
                self.in_flight += 1
                self.queries_sent += 1
                out.append(self._contacts[cid])
        return out

    def on_answer(self, contact: Contact, nodes: Iterable[Contact]) -> None:
        """``contact`` answered with ``nodes`` (only its first ``k`` are considered)."""
        state = self._state.get(contact.id)
        if state not in (_ASKED, _STALLED):
            return
        self._state[contact.id] = _ANSWERED
        self._leave(state)
        self.answers += 1
        ref = self._referrer.get(contact.id)
        self._answers_via[ref] = self._answers_via.get(ref, 0) + 1
        if ref is not None:
            self._ref_good[ref] = self._ref_good.get(ref, 0) + 1
        for suspect in [r for r, n in self._ref_bad.items() if n >= DISTRUST_AFTER]:
            self._judge(suspect)  # held back for want of a live comparison, maybe
        if contact.id not in self.distrusted:
            self._add(list(nodes)[: self.k], referrer=contact.id)

    def on_failure(self, contact: Contact) -> None:
        """``contact`` did not answer in time, or answered with garbage."""
        state = self._state.get(contact.id)
        if state not in (_ASKED, _STALLED):
            return
        self._state[contact.id] = _FAILED
        self._leave(state)
        self.failures += 1
        if state == _ASKED:  # a stalled one was blamed when it stalled
            self._blame(contact.id)

    def on_stalled(self, contact: Contact) -> None:
        """``contact`` has not answered within the stall time: free its slot, keep listening."""
        if self._state.get(contact.id) != _ASKED:
            return
        self._state[contact.id] = _STALLED
        self.in_flight -= 1
        self.stalled += 1
        self._blame(contact.id)

    def _blame(self, cid: bytes) -> None:
        """Count a dud against whoever referred ``cid``; distrust a referrer of mostly duds."""
        ref = self._referrer.get(cid)
        if ref is None or ref in self.distrusted:
            return
        self._ref_bad[ref] = self._ref_bad.get(ref, 0) + 1
        self._judge(ref)

    def _judge(self, ref: bytes) -> None:
        """Distrust ``ref`` once ``DISTRUST_AFTER`` of its referrals were duds and none
        answered, but only once some node that ``ref`` neither is nor referred has answered: a
        dud rate is damning only beside evidence that the rest of the network is alive. Alone,
        an honest node among many dead ones would be cut off, and with it the whole lookup."""
        if ref in self.distrusted or self._ref_good.get(ref):
            return
        if self._ref_bad.get(ref, 0) < DISTRUST_AFTER:
            return
        elsewhere = sum(n for r, n in self._answers_via.items() if r != ref)
        if self._state.get(ref) == _ANSWERED:
            elsewhere -= 1  # ref's own answer is no evidence about ref
        if elsewhere <= 0:
            return
        self.distrusted.add(ref)
        for other, by in self._referrer.items():
            if by == ref and self._state.get(other) == _NEW and other not in self._vouched:
                self._state[other] = _FAILED

    def _leave(self, state: int) -> None:
        if state == _ASKED:
            self.in_flight -= 1
        else:
            self.stalled -= 1

    @property
    def done(self) -> bool:
        if self.in_flight:
            return False
        return all(self._state[cid] != _NEW for cid in self._live_closest())

    def closest(self) -> list[Contact]:
        """The (up to) k closest trusted contacts that answered, nearest first."""
        out = []
        for _, cid in self._sorted:
            if self._state[cid] == _ANSWERED and cid not in self.distrusted:
                out.append(self._contacts[cid])
                if len(out) == self.k:
                    break
        return out


class RttEstimator:
    """Smoothed round-trip time, as TCP's retransmission timer computes it (RFC 6298).

    A lookup gives up waiting on a node (``Lookup.on_stalled``) after ``stall_after()``: a
    few round-trip deviations above the smoothed round trip, clamped to ``[floor, ceiling]``.
    On loopback that is the floor; on a real network it follows the network.
    """

    def __init__(self, *, floor: float, ceiling: float) -> None:
        self.floor = floor
        self.ceiling = ceiling
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, sample: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample

    def stall_after(self) -> float:
        if self.srtt is None:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.srtt + 4 * self.rttvar))
