"""First pieces first: the order in which a serving node writes answers, sans-IO.

Theory of operation
-------------------
At a release's start every leecher asks the origin for its first chunks at once. Written all
at once, the kernel decides the order: each socket buffer takes megabytes, the uplink's queue
gives most of the link to a few flows, and in the benchmark the eight leechers got their first
1 MiB chunk after 0.35 to 2.7 s, where one after another at the origin's full rate each would
have had one within ~0.7 s (every ~90 ms). A leecher with no chunk has nothing to trade, so
those seconds are lost to the whole swarm.

So a serving node keeps little unsent data in each socket (``TCP_NOTSENT_LOWAT``, set by the
shell: the order of writes is then the order bytes leave in) and orders its writes:

* A peer's **first piece** in a swarm (nothing written to it yet) goes before any other piece,
  and first pieces go **one at a time**, oldest first: at the full uplink rate each, rather than
  all sharing it and all landing late.
* Other pieces are written as they come, all at once (the kernel shares the uplink among them,
  which keeps it full; measured: writing every piece one at a time left 15-20% of the leechers'
  uplinks idle, because uploaders that each pick one receiver collide on receivers' downlinks),
  but not while a first piece waits or holds its turn, unless they waited ``max_wait``. Those
  already writing pause between slices while a first piece holds the turn (the shell asks
  :meth:`turn_held`), so a late joiner's first piece does not queue behind them.
* A first piece's **turn** ends when its write does, or after its turn limit (then the write
  goes on without holding the turn): a slow receiver never idles the uplink for long. The
  limit is ``TURN_SLACK`` times the piece's size over the median rate of recent first-piece
  writes (sizes differ fourfold and more, so durations alone would cut big pieces short),
  clamped to ``TURN_BOUNDS``; ``INITIAL_TURN`` before any was written.

The shell (``serving.py``) calls :meth:`want` when an answer is ready to be written, starts the
writes :meth:`grants` returns, calls :meth:`done` when a write ends or is given up, and looks
again at :meth:`next_change`.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from statistics import median

from .recent import RecentSet

__all__ = ["SendOrder"]

MAX_WAIT = 2.0
TURN_SLACK = 1.5
TURN_BOUNDS = (0.05, 2.0)
INITIAL_TURN = 0.25
#: A write shorter than this counts as this long (a piece that fit in the socket buffer).
MIN_DURATION = 0.001
#: Recent first-piece write rates kept for the turn limit.
HISTORY = 16
#: Peers remembered as served, at most (one forgotten gets its next piece as a first one).
MAX_PEERS = 4096


@dataclass
class _Waiting:
    peer: Hashable
    since: float
    size: int


class SendOrder:
    def __init__(self, *, max_wait: float = MAX_WAIT, turn: float = INITIAL_TURN) -> None:
        self.max_wait = max_wait
        self._waiting: dict[int, _Waiting] = {}  # ticket -> piece (tickets rise: oldest first)
        self._turn: tuple[int, float] | None = None  # (ticket, ends) of the first piece writing
        self._started: dict[int, tuple[float, int]] = {}  # first-piece ticket -> (granted, size)
        self._served: RecentSet[Hashable] = RecentSet(MAX_PEERS)  # peers given a piece
        self._rates: deque[float] = deque(maxlen=HISTORY)  # bytes/s of recent first pieces
        self._initial_turn = turn
        self._tickets = itertools.count()

    def want(self, peer: Hashable, now: float, size: int) -> int:
        """A piece of ``size`` bytes for ``peer`` (a peer in one swarm: the shell passes
        (node id, manifest id)) is ready to be written; returns its ticket."""
        ticket = next(self._tickets)
        self._waiting[ticket] = _Waiting(peer, now, size)
        return ticket

    def done(self, ticket: int, now: float) -> None:
        """The ticket's write ended (or was given up, before or after its grant)."""
        self._waiting.pop(ticket, None)
        if self._turn is not None and self._turn[0] == ticket:
            self._turn = None
        started = self._started.pop(ticket, None)
        if started is not None:
            when, size = started
            self._rates.append(size / max(now - when, MIN_DURATION))

    def turn_limit(self, size: int) -> float:
        """How long a first piece of ``size`` bytes may hold the turn."""
        if not self._rates:
            return self._initial_turn
        low, high = TURN_BOUNDS
        return min(high, max(low, TURN_SLACK * size / median(self._rates)))

    def grants(self, now: float) -> list[int]:
        """Tickets whose write may start now (each returned once)."""
        if self._turn is not None and self._turn[1] <= now:
            self._turn = None  # still writing, no longer holding the turn
        granted: list[int] = []
        # A peer's first piece is its oldest waiting one while nothing was written to it;
        # the rest of its pipelined requests are later pieces.
        first: dict[Hashable, int] = {}
        for ticket, w in self._waiting.items():
            if w.peer not in self._served:
                first.setdefault(w.peer, ticket)
        if first and self._turn is None:
            ticket = min(first.values())
            size = self._waiting[ticket].size
            self._turn = (ticket, now + self.turn_limit(size))
            self._started[ticket] = (now, size)
            granted.append(ticket)
        blocked = self._turn is not None or len(first) > len(granted)
        firsts = set(first.values())
        for ticket, w in self._waiting.items():
            if ticket not in firsts and (not blocked or now - w.since >= self.max_wait):
                granted.append(ticket)
        for ticket in granted:
            self._served.add(self._waiting.pop(ticket).peer)
        return granted

    def next_change(self) -> float:
        """When the turn ends or a waiting piece has waited ``max_wait`` (inf: neither)."""
        times = [w.since + self.max_wait for w in self._waiting.values()]
        if self._turn is not None:
            times.append(self._turn[1])
        return min(times, default=math.inf)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def turn_held(self) -> bool:
        return self._turn is not None

    def holds_turn(self, ticket: int) -> bool:
        return self._turn is not None and self._turn[0] == ticket
