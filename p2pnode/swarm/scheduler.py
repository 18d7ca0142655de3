"""Which chunk to ask of which peer, and when: the fetch side's decisions, sans-IO.

Theory of operation
-------------------
One :class:`Scheduler` serves one fetch (a manifest and the chunk indexes this node lacks). The
trio shell (``fetching.py``) feeds it what the peers say (``bitfield``, ``have``, ``remove_peer``)
and what happened to requests (``received``, ``rejected``, ``timed_out``), all with ``now``
passed in, and asks it ``next_requests(peer, now)`` whenever a peer's pipeline has room. It
never touches a socket, so every rule below is unit-tested with explicit times
(``tests/swarm/test_scheduler.py``).

* **Rarest first**, ties broken at random: leechers that start together fetch different chunks
  and can trade them at once. Availability is counted incrementally per chunk.
* **Pipelines sized by rate.** A peer may have ``depth(peer)`` requests outstanding: enough to
  keep ``PIPELINE_SECONDS`` of its measured rate in flight (so a fast peer never idles for a
  round trip), never fewer than ``MIN_DEPTH`` nor more than ``MAX_DEPTH``, and ``START_DEPTH``
  until a rate is known. A slow peer therefore holds few chunks hostage: what it has claimed is
  what it will deliver soon.
* **Endgame.** When every chunk this peer could give is already in flight elsewhere, the peer
  may duplicate a request that is *late*: outstanding longer than ``ENDGAME_SLACK`` times what
  its holder's measured rate predicts. The first copy to arrive wins; the others are cancelled
  (``take_cancels``). Duplicates are never asked of origins (seed boxes, which say so in their
  hello; ``origins``): at the end of a release the chunks still missing are usually the ones
  only the origin held, and the origin's upload is what a swarm exists to save. Leechers that
  finished and stayed are fair game. A chunk is requested at most ``MAX_COPIES`` times at once.
* **Sparing origins.** A seed box (an *origin*, which says so in its hello) is asked only for
  chunks that at most ``ORIGIN_SPARE_COPIES`` other connected peers hold: the origin's upload
  goes to chunks the swarm lacks, and leechers trade the rest among themselves. Measured on
  the default bench_swarm case: not sparing, origin upload ~2.0x the release at ~1.2x the
  bound; sparing everything others hold (0 copies), 1.45x at 1.32x; one copy, 1.67x at 1.26x.
* **Deferral.** A ``frugal`` reject (an origin that will not upload a chunk twice while others
  were never uploaded) means "ask someone else, or me later"; the pair is skipped for
  ``FRUGAL_RETRY`` seconds.
* **The CDN, in the same schedule** (``enable_cdn``, ``cdn_requests``). The CDN is one more
  source, named :data:`CDN`, that holds everything but counts for no chunk's availability
  (rarest-first ranks what *peers* hold). It gets, up to the depth the shell allows: chunks
  no connected peer has held for ``CDN_GRACE`` seconds (peers are still connecting and sending
  bitfields at the start; a delta's new chunks nobody has yet), and a copy of a request to a
  peer that missed its deadline: outstanding longer than ``CDN_SLACK`` times what the
  holder's rate predicts and at least ``CDN_MIN_WAIT``, or longer than ``CDN_MAX_WAIT``
  whatever its rate (a slow peer's own pace is no excuse). The first copy to land wins, as in
  the endgame. Everything else stays with the peers; when no peer offers anything at all
  (``peers_exhausted``), the shell ends the swarm phase and the CDN fetcher takes the rest in
  bulk (more connections, whole ranges).
* **When to look again.** Every change to what peers hold or to a request bumps ``version``, so
  the shell wakes its waiting tasks only when something changed. Between changes, decisions
  move only with time, and the scheduler says when: ``next_change(peer)`` (a deferral ends, a
  request elsewhere turns late enough to duplicate), ``next_cdn_change`` (a chunk's grace
  ends, a request misses the CDN deadline, the wait on leechers ends) and ``phase_deadline``
  (the stall timeout, the end of the wait on leechers).
* **Leechers.** A connected peer that lacks part of the release and knew it without being
  shown it (``leechers``) is fetching it too: its haves may soon offer what nobody has yet.
  While one is connected and a chunk landed within ``LEECHER_WAIT`` seconds
  (``waiting_on_leechers``), chunks nobody holds go neither to the CDN nor make the swarm
  phase end: leechers told only of other leechers all start with nothing to give each other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .ratemeter import RateMeter

__all__ = [
    "CDN",
    "MAX_COPIES",
    "MAX_DEPTH",
    "MIN_DEPTH",
    "PIPELINE_SECONDS",
    "START_DEPTH",
    "RateMeter",
    "Scheduler",
]

START_DEPTH = 4
MIN_DEPTH = 2
MAX_DEPTH = 32  # well inside the session's MAX_OUTSTANDING (64)
#: Seconds of a peer's rate kept in flight: covers a round trip and the peer's read latency.
PIPELINE_SECONDS = 1.0
#: A request is late (endgame may duplicate it) past this multiple of its expected time.
ENDGAME_SLACK = 2.0
#: The expected time of a chunk whose holder has no measured rate yet.
UNMEASURED_CHUNK_SECONDS = 2.0
MAX_COPIES = 2
#: An origin is asked only for chunks that at most this many other connected peers hold.
ORIGIN_SPARE_COPIES = 1
FRUGAL_RETRY = 1.0
#: The name of the CDN as a source (peer names are "host:port": no clash).
CDN = "cdn"
#: A chunk no connected peer has held for this long goes to the CDN.
CDN_GRACE = 2.0
#: A request to a peer goes to the CDN too when later than this multiple of its expected time...
CDN_SLACK = 4.0
#: ...and outstanding at least this long; past CDN_MAX_WAIT, whatever the holder's rate.
CDN_MIN_WAIT = 5.0
CDN_MAX_WAIT = 20.0
#: No peer has a chunk we lack, but some are fetching this release too: wait this long since
#: the last chunk (or the start) for their haves before the CDN or the end of the swarm phase
#: takes it.
LEECHER_WAIT = 5.0


@dataclass
class _Peer:
    bits: bytearray
    inflight: dict[int, float] = field(default_factory=dict)  # index -> requested at
    deferred: dict[int, float] = field(default_factory=dict)  # index -> not before
    meter: RateMeter = field(default_factory=RateMeter)
    delivering: float = 0.0  # the rate when its last piece arrived (a stall does not lower it)


class Scheduler:
    """Args:
    sizes: every unique chunk's size, by index (the manifest's unique chunks in order).
    wanted: the indexes this node lacks.
    rng: a ``random.Random`` (tests pass a seeded one).
    now: the clock when the fetch starts (what ``leecher_wait`` first counts from).
    leecher_wait: see ``waiting_on_leechers``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        wanted: Iterable[int],
        *,
        rng: random.Random | None = None,
        pipeline_seconds: float = PIPELINE_SECONDS,
        now: float = 0.0,
        leecher_wait: float = LEECHER_WAIT,
    ) -> None:
        self.sizes = list(sizes)
        self.n = len(self.sizes)
        self.wanted = {i for i in wanted if 0 <= i < self.n}
        self.missing = set(self.wanted)
        self.done: set[int] = set()
        self.count = [0] * self.n  # peers that have each chunk
        self.holders: dict[int, set[str]] = {}  # index in flight -> peers asked
        self.peers: dict[str, _Peer] = {}
        self.origins: set[str] = set()  # peers whose upload is spared (no endgame copies)
        #: Connected peers fetching this release too (they lack some of it and knew it
        #: without being shown it): their haves may soon offer what nobody has yet.
        self.leechers: set[str] = set()
        self.last_progress = now  # when a chunk last landed (or the fetch began)
        self.leecher_wait = leecher_wait
        self.pipeline_seconds = pipeline_seconds
        self._cancels: dict[str, set[int]] = {}
        self._rng = rng or random.Random()
        self._mean_size = sum(self.sizes) / self.n if self.n else 1.0
        self._held_at: dict[int, float] = {}  # missing index -> when a peer last held it
        self._cdn_since: float | None = None  # when the CDN became a source (None: it is not)
        #: Bumped by every change to what peers hold or to a request (see ``next_change``).
        self.version = 0

    # -- what peers hold --------------------------------------------------------------------

    def bitfield(self, peer: str, bits: bytes, *, earlier_build: bool = False) -> None:
        """The peer's availability (replacing any earlier one). ``earlier_build``: it holds
        only an earlier build (it was shown this manifest), so it is not fetching this one and
        what it lacks will not come from it."""
        p = self.peers.get(peer)
        if p is None:
            p = self.peers[peer] = _Peer(bytearray(bits))
        else:
            self._uncount(p)
            p.bits = bytearray(bits)
        for i in range(min(self.n, len(p.bits) * 8)):
            if p.bits[i >> 3] & (0x80 >> (i & 7)):
                self.count[i] += 1
        if not earlier_build and not all(self._has(p, i) for i in range(self.n)):
            self.leechers.add(peer)
        else:
            self.leechers.discard(peer)
        self.version += 1

    def add_origin(self, peer: str) -> None:
        """``peer`` is a seed box whose upload is spared (it said so in its hello)."""
        self.origins.add(peer)
        self.version += 1

    def have(self, peer: str, i: int) -> None:
        p = self.peers.get(peer)
        if p is None or not 0 <= i < self.n or i >> 3 >= len(p.bits) or self._has(p, i):
            return
        p.bits[i >> 3] |= 0x80 >> (i & 7)
        self.count[i] += 1
        self.version += 1

    def has(self, peer: str, i: int) -> bool:
        p = self.peers.get(peer)
        return p is not None and self._has(p, i)

    @staticmethod
    def _has(p: _Peer, i: int) -> bool:
        return i >> 3 < len(p.bits) and bool(p.bits[i >> 3] & (0x80 >> (i & 7)))

    def _uncount(self, p: _Peer, now: float | None = None) -> None:
        for i in range(min(self.n, len(p.bits) * 8)):
            if p.bits[i >> 3] & (0x80 >> (i & 7)):
                self._drop_count(i, now)

    def _drop_count(self, i: int, now: float | None) -> None:
        """One peer fewer holds ``i``; at ``now`` (when known), the CDN's grace for it starts
        if nobody holds it any more."""
        self.count[i] -= 1
        if now is not None and self.count[i] == 0 and i in self.missing:
            self._held_at[i] = now

    def remove_peer(self, peer: str, now: float | None = None) -> list[int]:
        """The peer is gone (at ``now``): its requests go back to the pool. Returns them."""
        p = self.peers.pop(peer, None)
        self._cancels.pop(peer, None)
        self.leechers.discard(peer)
        self.version += 1
        if p is None:
            return []
        self._uncount(p, now)
        for i in p.inflight:
            self._drop_holder(i, peer)
        return sorted(p.inflight)

    # -- choosing ---------------------------------------------------------------------------

    def rate(self, peer: str, now: float) -> float:
        p = self.peers.get(peer)
        return p.meter.rate(now) if p is not None else 0.0

    def depth(self, peer: str, now: float) -> int:
        """How many requests this peer may have outstanding."""
        p = self.peers.get(peer)
        if p is None:
            return 0
        rate = p.meter.rate(now)
        if rate <= 0:
            return START_DEPTH
        want = math.ceil(rate * self.pipeline_seconds / self._mean_size) + 1
        return max(MIN_DEPTH, min(MAX_DEPTH, want))

    def next_requests(self, peer: str, now: float) -> list[int]:
        """Chunks to request from ``peer`` now (recorded as in flight there)."""
        p = self.peers.get(peer)
        if p is None:
            return []
        room = self.depth(peer, now) - len(p.inflight)
        picked: list[int] = []
        while room > 0:
            i = self._rarest(p, now, only_here=peer in self.origins)
            if i is None:
                i = self._endgame(peer, p, now)
            if i is None:
                break
            self._claim(peer, p, i, now)
            picked.append(i)
            room -= 1
        return picked

    def _rarest(self, p: _Peer, now: float, *, only_here: bool = False) -> int | None:
        """``only_here`` (asking an origin): only chunks no other connected peer has."""
        best: list[int] = []
        best_count = 1 << 30
        origins = [self.peers[o] for o in self.origins if o in self.peers]
        for i in self.missing:
            if i in self.holders or not self._has(p, i) or p.deferred.get(i, 0.0) > now:
                continue
            c = self.count[i]
            if only_here and c - sum(1 for o in origins if self._has(o, i)) > ORIGIN_SPARE_COPIES:
                continue
            if c < best_count:
                best, best_count = [i], c
            elif c == best_count:
                best.append(i)
        return self._rng.choice(best) if best else None

    def _endgame(self, peer: str, p: _Peer, now: float) -> int | None:
        """The latest request this peer could duplicate, or None (see the module's notes)."""
        if peer in self.origins:
            return None  # never spend an origin's upload on a duplicate
        best, best_late = None, 0.0
        for i, asked in self.holders.items():
            if peer in asked or len(asked) >= MAX_COPIES or not self._has(p, i):
                continue
            if p.deferred.get(i, 0.0) > now:
                continue
            late = min(self._lateness(h, i, now) for h in asked)
            if late > best_late:
                best, best_late = i, late
        return best

    def _expected(self, holder: str) -> float:
        """Seconds the holder's requests take by its rate: queued behind its other requests,
        its whole pipeline must drain first."""
        h = self.peers[holder]
        rate = h.delivering
        queued = sum(self.sizes[j] for j in h.inflight)
        return queued / rate if rate > 0 else UNMEASURED_CHUNK_SECONDS * len(h.inflight)

    def _lateness(self, holder: str, i: int, now: float, slack: float = ENDGAME_SLACK) -> float:
        """How far past ``slack`` times its expected time the holder's request for ``i`` is
        (> 0: late)."""
        return (now - self.peers[holder].inflight[i]) - slack * self._expected(holder)

    def next_change(self, peer: str, now: float) -> float:
        """When ``next_requests(peer)`` may give more with nothing else changing (``version``
        the same): a deferral of this peer's ends, or a request elsewhere that it could
        duplicate turns late (endgame). ``math.inf`` when only a change can."""
        p = self.peers.get(peer)
        if p is None:
            return math.inf
        at = min((t for t in p.deferred.values() if t > now), default=math.inf)
        if peer in self.origins:
            return at  # never asked for duplicates
        for i, asked in self.holders.items():
            if peer in asked or len(asked) >= MAX_COPIES or not self._has(p, i):
                continue
            if p.deferred.get(i, 0.0) > now:
                continue  # (when its deferral ends is counted above)
            late_at = min(
                self.peers[h].inflight[i] + ENDGAME_SLACK * self._expected(h) for h in asked
            )
            at = min(at, late_at)
        return at

    def _claim(self, peer: str, p: _Peer, i: int, now: float) -> None:
        p.inflight[i] = now
        p.meter.start(now)
        self.holders.setdefault(i, set()).add(peer)
        self.version += 1

    def _drop_holder(self, i: int, peer: str) -> None:
        asked = self.holders.get(i)
        if asked is not None:
            asked.discard(peer)
            if not asked:
                del self.holders[i]

    # -- the CDN ----------------------------------------------------------------------------

    def enable_cdn(self, now: float) -> None:
        """The CDN becomes a source: it holds every chunk and is counted for none."""
        if self._cdn_since is None:
            self._cdn_since = now
            self.peers[CDN] = _Peer(bytearray(b"\xff" * ((self.n + 7) // 8)))
            self.version += 1

    def disable_cdn(self) -> list[int]:
        """The CDN failed: no more chunks go to it. Returns what it still held (back in the
        pool)."""
        if self._cdn_since is None:
            return []
        self._cdn_since = None
        self.version += 1
        p = self.peers.pop(CDN)
        self._cancels.pop(CDN, None)
        for i in p.inflight:
            self._drop_holder(i, CDN)
        return sorted(p.inflight)

    def cdn_requests(self, now: float, room: int) -> list[int]:
        """Up to ``room`` chunks to fetch from the CDN now (recorded as in flight there):
        chunks no peer has held for ``CDN_GRACE`` (not while ``waiting_on_leechers``), then
        the latest requests past their deadline (see the module's notes)."""
        since = self._cdn_since
        if since is None or room <= 0:
            return []
        cdn = self.peers[CDN]
        unheld = not self.waiting_on_leechers(now)
        picked: list[int] = []
        for i in sorted(self.missing):
            if self.count[i] > 0:
                self._held_at[i] = now
            elif (
                unheld and i not in self.holders and now - self._held_at.get(i, since) >= CDN_GRACE
            ):
                picked.append(i)
        late = []
        for i, asked in self.holders.items():
            if CDN in asked:
                continue
            overdue = min(self._cdn_overdue(h, i, now) for h in asked)
            if overdue > 0:
                late.append((overdue, i))
        picked += [i for _, i in sorted(late, reverse=True)]
        picked = picked[:room]
        for i in picked:
            self._claim(CDN, cdn, i, now)
        return picked

    def _cdn_overdue(self, holder: str, i: int, now: float) -> float:
        """How far past the CDN deadline the holder's request for ``i`` is (> 0: overdue)."""
        waited = now - self.peers[holder].inflight[i]
        late = self._lateness(holder, i, now, CDN_SLACK)
        return max(min(waited - CDN_MIN_WAIT, late), waited - CDN_MAX_WAIT)

    def next_cdn_change(self, now: float) -> float:
        """When ``cdn_requests`` may give more with nothing else changing (``version`` the
        same): the wait on leechers ends, a chunk nobody holds ends its grace, or a request
        to a peer misses its CDN deadline (the moment ``_cdn_overdue`` turns positive).
        ``math.inf`` when the CDN is not a source or only a change can."""
        since = self._cdn_since
        if since is None:
            return math.inf
        at = math.inf
        if self.waiting_on_leechers(now):
            at = self.last_progress + self.leecher_wait
        else:
            for i in self.missing:
                if self.count[i] == 0 and i not in self.holders:
                    at = min(at, self._held_at.get(i, since) + CDN_GRACE)
        for i, asked in self.holders.items():
            if CDN in asked:
                continue
            for h in asked:
                wait = min(max(CDN_MIN_WAIT, CDN_SLACK * self._expected(h)), CDN_MAX_WAIT)
                at = min(at, self.peers[h].inflight[i] + wait)
        return at

    # -- outcomes ---------------------------------------------------------------------------

    def received(self, peer: str, i: int, nbytes: int, now: float) -> bool:
        """A verified chunk ``i`` came from ``peer``. True when it is new; the other peers
        asked for it get a cancel (``take_cancels``)."""
        p = self.peers.get(peer)
        if p is not None:
            p.inflight.pop(i, None)
            p.meter.add(nbytes, now)
            p.delivering = p.meter.rate(now)
        self._drop_holder(i, peer)
        self.version += 1
        if i not in self.missing:
            return False
        self.missing.discard(i)
        self.done.add(i)
        self.last_progress = now
        for other in self.holders.pop(i, set()):
            op = self.peers.get(other)
            if op is not None:
                op.inflight.pop(i, None)
                self._cancels.setdefault(other, set()).add(i)
        return True

    def failed(self, peer: str, i: int) -> None:
        """``peer`` sent bytes for ``i`` that fail verification: ask again, elsewhere first."""
        p = self.peers.get(peer)
        if p is not None:
            p.inflight.pop(i, None)
            p.deferred[i] = math.inf
        self._drop_holder(i, peer)
        self.version += 1

    def rejected(self, peer: str, i: int, reason: bytes, now: float) -> None:
        """The peer will not serve ``i``: ``frugal`` (later), ``choked`` (not now), else it
        does not have the chunk after all."""
        p = self.peers.get(peer)
        if p is None:
            return
        p.inflight.pop(i, None)
        self._drop_holder(i, peer)
        self.version += 1
        if reason == b"frugal":
            p.deferred[i] = now + FRUGAL_RETRY
        elif reason != b"choked" and self._has(p, i):
            p.bits[i >> 3] &= ~(0x80 >> (i & 7)) & 0xFF
            self._drop_count(i, now)

    def timed_out(self, peer: str, i: int) -> None:
        """Our request to ``peer`` was given up (the shell sends the cancel)."""
        p = self.peers.get(peer)
        if p is not None:
            p.inflight.pop(i, None)
        self._drop_holder(i, peer)
        self.version += 1

    def take_cancels(self, peer: str) -> set[int]:
        """Requests to ``peer`` that another peer answered first: cancel them."""
        return self._cancels.pop(peer, set())

    # -- the fetch as a whole ---------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return not self.missing

    def inflight(self, peer: str) -> int:
        p = self.peers.get(peer)
        return len(p.inflight) if p is not None else 0

    def offered(self) -> bool:
        """Some missing chunk is in flight or held by a connected peer."""
        if self.holders:
            return True
        return any(self.count[i] > 0 for i in self.missing)

    def waiting_on_leechers(self, now: float) -> bool:
        """A connected peer is fetching this release too and a chunk landed within
        ``leecher_wait``: what no peer has yet may come with its haves (leechers told only of
        leechers all start with nothing to give each other), so neither the CDN nor the end
        of the swarm phase should take it now."""
        return bool(self.leechers) and now - self.last_progress <= self.leecher_wait

    def peers_exhausted(self, now: float, connecting: int) -> bool:
        """Peers can give no more: no connected peer offers a missing chunk, none of
        ``connecting`` peers may still show one, and no leecher is about to."""
        return not self.offered() and connecting == 0 and not self.waiting_on_leechers(now)

    def phase_deadline(self, stall_timeout: float) -> float:
        """When the swarm phase may end with nothing else changing: ``stall_timeout`` after
        the last chunk landed, or sooner when the wait on leechers ends (then
        ``peers_exhausted`` may turn true)."""
        at = self.last_progress + stall_timeout
        if self.leechers:
            at = min(at, self.last_progress + self.leecher_wait)
        return at
