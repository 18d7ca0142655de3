"""Swarm state in memory: the announce hot path, with no I/O.

Theory of operation
-------------------
An announce used to be one SQLite transaction (or one Redis script) plus ranking a few hundred
candidates and serialising them: about 3 ms of CPU, so ~400 announces/s. Swarm state is small
(a few hundred bytes per live member) and disposable, so each tracker process keeps it in
memory in :class:`MemorySwarm`, and durability is somebody else's job:

* with SQLite, :class:`tracker.swarm_sqlite.SQLiteSwarm` holds one and writes the changes
  behind (:meth:`MemorySwarm.take_dirty`, batched every second from a worker thread);
* in the Redis log mode, every replica of :class:`tracker.swarm_log.LogSwarm` holds one and
  applies the same changes in the order of a Redis stream (:mod:`tracker.swarm_log_state`).

(The Redis script mode, :mod:`tracker.swarm_redis`, keeps its state in Redis instead.) This
module does no I/O: it is the sans-IO core those stores wrap in the async
:class:`tracker.backend.SwarmStore` interface.

Per swarm (one manifest) the members live in a dict **ordered by expiry**: a re-announce pops
the member and re-inserts it at the end, and since every expiry is ``now + ttl`` the oldest is
always first, so expiring is popping from the front (amortised O(1) per announce) and the
seeder/leecher counts are exact counters.

Ranking (what an answer lists, in which order, and how that stays cheap):
:mod:`tracker.swarm_rank`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from .backend import AnnounceAnswer, AnnounceCommit, ReportCommit
from .quality import PeerQuality, update_quality
from .stats import quality_stats, release_stats
from .swarm_members import Dirty, Member, SwarmMembers
from .swarm_rank import PARTIAL_SWARMS, PARTIAL_WINDOW_S, RANK_REFRESH, SwarmRanking

__all__ = [
    "PARTIAL_SWARMS",
    "PARTIAL_WINDOW_S",
    "RANK_REFRESH",
    "MemorySwarm",
]

#: Completions are bucketed per minute for the adoption curve; buckets older than this go,
#: and so does the memory of which nodes completed a build once its last completion is older.
ADOPTION_KEEP_S = 7 * 24 * 3600


class MemorySwarm(SwarmRanking):
    """Swarm state, peer quality, counters and the replay guard of one process, in memory.

    Args:
        track_dirty: remember what changed for :meth:`take_dirty` (the SQLite write-behind).
    """

    def __init__(self, *, track_dirty: bool = False) -> None:
        self._swarms: dict[bytes, SwarmMembers] = {}
        #: app -> manifest -> time of its last announce (for partial seeds)
        self._builds: dict[str, dict[bytes, float]] = {}
        #: node -> manifests whose swarm it is in (to refresh it when its score changes)
        self._where: dict[bytes, set[bytes]] = {}
        #: manifest -> [app, completed, from_peers, from_cdn, uploaded]
        self._releases: dict[bytes, list[Any]] = {}
        self._adoption: dict[tuple[bytes, int], int] = {}
        #: manifest -> ids of the nodes whose completion of it was counted, and the time of
        #: its latest (the set goes ``ADOPTION_KEEP_S`` after that)
        self._done: dict[bytes, set[bytes]] = {}
        self._done_at: dict[bytes, float] = {}
        self._quality: dict[bytes, PeerQuality] = {}
        self._corrupt_by: dict[bytes, set[bytes]] = {}
        self._scores: dict[bytes, float] = {}
        self._flagged: set[bytes] = set()
        self._seen: dict[bytes, float] = {}
        self._seen_order: deque[tuple[float, bytes]] = deque()
        self._track = track_dirty
        self._d_peers: set[tuple[bytes, bytes]] = set()
        self._d_releases: set[bytes] = set()
        self._d_adoption: set[tuple[bytes, int]] = set()
        self._d_done: list[tuple[bytes, bytes, float]] = []
        self._d_quality: set[bytes] = set()
        self._d_corrupt: list[tuple[bytes, bytes]] = []
        self._d_seen: list[tuple[bytes, float]] = []
        self._d_gc: float | None = None

    # ------------------------------------------------------------------ replay guard

    def fresh(self, digest: bytes, now: float, window: float) -> bool:
        """Remember ``digest`` for ``window`` seconds; False if it is already remembered."""
        exp = self._seen.get(digest)
        if exp is not None and exp > now:
            return False
        self._seen[digest] = now + window
        self._seen_order.append((now + window, digest))
        if self._track:
            self._d_seen.append((digest, now + window))
        return True

    def restore_seen(self, digests: Iterable[tuple[bytes, float]]) -> None:
        """Remember replay digests read back from a file or a snapshot: (digest, expiry),
        oldest expiry first. Not tracked as changes (they are where they came from)."""
        for digest, expires in digests:
            self._seen[digest] = expires
            self._seen_order.append((expires, digest))

    # ------------------------------------------------------------------ members

    def _swarm(self, manifest: bytes, app: str) -> SwarmMembers:
        sw = self._swarms.get(manifest)
        if sw is None:
            sw = self._swarms[manifest] = SwarmMembers(manifest, app)
        return sw

    def _remove(self, sw: SwarmMembers, node: bytes) -> Member | None:
        m = sw.members.pop(node, None)
        if m is None:
            return None
        if m.left == 0:
            sw.seeds -= 1
        sw.ranked = None
        where = self._where.get(node)
        if where is not None:
            where.discard(sw.manifest)
            if not where:
                del self._where[node]
        if self._track:
            self._d_peers.add((sw.manifest, node))
        return m

    def _expire(self, sw: SwarmMembers, now: float) -> int:
        """Drop the members whose expiry passed, from the front (the oldest)."""
        n = 0
        members = sw.members
        while members:
            first = next(iter(members.values()))
            if first.expires > now:
                break
            self._remove(sw, first.node)
            n += 1
        return n

    def apply_member(self, m: Member, now: float) -> None:
        """Put ``m`` in its swarm (replacing the node's previous entry there), latest expiry."""
        sw = self._swarm(m.manifest, m.app)
        old = sw.members.pop(m.node, None)
        if old is None:
            sw.ranked = None
            self._where.setdefault(m.node, set()).add(m.manifest)
            if m.left == 0:
                sw.seeds += 1
        else:
            if (old.left == 0) != (m.left == 0):
                sw.seeds += 1 if m.left == 0 else -1
            if old.left != m.left:
                sw.stale = True
            if (old.port == 0) != (m.port == 0):
                sw.top = None  # it starts or stops being handed out
            # update in place (the sorted list holds this object): every slot but the key
            # (manifest, node); the fragment is rendered again when next needed
            old.app = m.app
            old.key = m.key
            old.ip = m.ip
            old.port = m.port
            old.size = m.size
            old.left = m.left
            old.from_peers = m.from_peers
            old.from_cdn = m.from_cdn
            old.uploaded = m.uploaded
            old.expires = m.expires
            old.record = m.record
            old.frag = None
            m = old
        sw.members[m.node] = m
        if self._track:
            self._d_peers.add((m.manifest, m.node))
        builds = self._builds.setdefault(m.app, {})
        builds[m.manifest] = max(now, builds.get(m.manifest, 0.0))

    def remove_member(self, manifest: bytes, node: bytes) -> None:
        sw = self._swarms.get(manifest)
        if sw is not None:
            self._remove(sw, node)

    def member(self, manifest: bytes, node: bytes, now: float) -> Member | None:
        sw = self._swarms.get(manifest)
        m = sw.members.get(node) if sw is not None else None
        return m if m is not None and m.expires > now else None

    def live_members(self, now: float) -> int:
        return sum(
            1 for sw in self._swarms.values() for m in sw.members.values() if m.expires > now
        )

    # ------------------------------------------------------------------ announce

    def announce(self, c: AnnounceCommit) -> AnnounceAnswer | None:
        """Apply a verified announce and answer it; ``None`` if it is a replay (nothing changed).

        The counters take only increases of the node's cumulative totals; a ``completed``
        event counts once per node and build (:meth:`first_completion`), whatever the node's
        earlier announces said: a serving node announces ``left = 0`` as soon as it holds the
        build, before its completion report arrives.
        """
        a, now = c.announce, c.now
        if not self.fresh(c.digest, now, c.window):
            return None
        sw = self._swarm(a.manifest, a.app)
        self._expire(sw, now)
        old = sw.members.get(a.node_id)
        if old is not None and old.expires <= now:
            self._remove(sw, a.node_id)
            old = None
        ofp, ofc, oup = (old.from_peers, old.from_cdn, old.uploaded) if old else (0, 0, 0)
        completed = 0
        if a.event == "completed" and self.first_completion(a.manifest, a.node_id, now):
            completed = 1
        self.count(
            a.manifest,
            a.app,
            completed=completed,
            from_peers=max(0, a.from_peers - ofp),
            from_cdn=max(0, a.from_cdn - ofc),
            uploaded=max(0, a.uploaded - oup),
            now=now,
        )
        if a.event == "stopped":
            self._remove(sw, a.node_id)
        else:
            self.apply_member(
                Member(
                    a.manifest,
                    a.node_id,
                    a.app,
                    a.public_key,
                    c.ip,
                    a.port,
                    a.size,
                    a.left,
                    max(a.from_peers, ofp),
                    max(a.from_cdn, ofc),
                    max(a.uploaded, oup),
                    now + c.ttl,
                    c.record,
                ),
                now,
            )
        return self._answer(sw, a.app, a.node_id, a.numwant, now)  # sw was just expired

    def count(
        self,
        manifest: bytes,
        app: str,
        *,
        completed: int,
        from_peers: int,
        from_cdn: int,
        uploaded: int,
        now: float,
    ) -> None:
        """Add to a release's counters (and to the adoption curve for a completion)."""
        rel = self._releases.get(manifest)
        if rel is None:
            rel = self._releases[manifest] = [app, 0, 0, 0, 0]
            if self._track:
                self._d_releases.add(manifest)
        if completed or from_peers or from_cdn or uploaded:
            rel[1] += completed
            rel[2] += from_peers
            rel[3] += from_cdn
            rel[4] += uploaded
            if self._track:
                self._d_releases.add(manifest)
        if completed:
            key = (manifest, int(now // 60))
            self._adoption[key] = self._adoption.get(key, 0) + completed
            if self._track:
                self._d_adoption.add(key)

    def first_completion(self, manifest: bytes, node: bytes, now: float) -> bool:
        """Remember that ``node`` completed ``manifest``; whether this is the first time (so
        re-announces, repairs and replicas applying the same log count it once)."""
        done = self._done.setdefault(manifest, set())
        self._done_at[manifest] = now
        if node in done:
            return False
        done.add(node)
        if self._track:
            self._d_done.append((manifest, node, now))
        return True

    def restore_completion(self, manifest: bytes, node: bytes, at: float) -> None:
        """Remember a counted completion read back from a file or a snapshot (untracked)."""
        self._done.setdefault(manifest, set()).add(node)
        self._done_at[manifest] = max(at, self._done_at.get(manifest, at))

    def set_release(self, manifest: bytes, app: str, counters: Iterable[int]) -> None:
        """Set a release's counters (completed, from_peers, from_cdn, uploaded) outright."""
        self._releases[manifest] = [app, *counters]

    def set_adoption(self, manifest: bytes, minute: int, completed: int) -> None:
        self._adoption[(manifest, minute)] = completed

    def answer(
        self, manifest: bytes, app: str, exclude: bytes, numwant: int, now: float
    ) -> AnnounceAnswer:
        """The ranked answer for a node of ``manifest``'s swarm (see :mod:`tracker.swarm_rank`)."""
        sw = self._swarms.get(manifest)
        if sw is None:
            return AnnounceAnswer([], 0, 0)
        self._expire(sw, now)
        return self._answer(sw, app, exclude, numwant, now)

    # ------------------------------------------------------------------ quality

    def report(self, c: ReportCommit) -> bool:
        """Fold a verified report into peer quality; False if it is a replay."""
        r = c.report
        if not self.fresh(c.digest, c.now, c.window):
            return False
        for e in r.peers:
            q = self._quality.get(e.node_id)
            if q is None:
                q = self._quality[e.node_id] = PeerQuality()
            new_reporter = False
            if e.corrupt > 0:
                seen = self._corrupt_by.setdefault(e.node_id, set())
                if r.node_id not in seen:
                    seen.add(r.node_id)
                    new_reporter = True
                    if self._track:
                        self._d_corrupt.append((e.node_id, r.node_id))
            update_quality(q, e, new_corrupt_reporter=new_reporter)
            self.set_score(e.node_id, q.score, q.flagged)
            if self._track:
                self._d_quality.add(e.node_id)
        return True

    def set_score(self, node: bytes, score: float | None, flagged: bool) -> None:
        """Set (or with ``None`` forget) a node's score; its swarms re-sort at their next read."""
        if score is None:
            self._scores.pop(node, None)
        else:
            self._scores[node] = score
        if flagged:
            self._flagged.add(node)
        else:
            self._flagged.discard(node)
        for mid in self._where.get(node, ()):
            sw = self._swarms[mid]
            sw.ranked = None
            m = sw.members.get(node)
            if m is not None:
                m.frag = None

    def quality(self, node_id: bytes) -> PeerQuality:
        q = self._quality.get(node_id)
        return PeerQuality() if q is None else _copy(q)

    def set_quality(self, node_id: bytes, q: PeerQuality, reporters: Iterable[bytes]) -> None:
        self._quality[node_id] = q
        self._corrupt_by[node_id] = set(reporters)
        self.set_score(node_id, q.score, q.flagged)

    def clear_peer(self, node_id: bytes) -> bool:
        had = self._quality.pop(node_id, None) is not None
        self._corrupt_by.pop(node_id, None)
        self.set_score(node_id, None, False)
        if self._track:
            self._d_quality.add(node_id)
        return had

    # ------------------------------------------------------------------ housekeeping

    def gc(self, now: float) -> int:
        """Drop expired members of every swarm, old replay digests and old adoption buckets."""
        removed = 0
        for sw in list(self._swarms.values()):
            removed += self._expire(sw, now)
            for node in [n for n, m in sw.members.items() if m.expires <= now]:
                self._remove(sw, node)
                removed += 1
        order = self._seen_order
        while order and order[0][0] <= now:
            _, digest = order.popleft()
            if self._seen.get(digest, now + 1) <= now:
                del self._seen[digest]
        oldest = int((now - ADOPTION_KEEP_S) // 60)
        for key in [k for k in self._adoption if k[1] < oldest]:
            del self._adoption[key]
        for mid in [m for m, t in self._done_at.items() if t < now - ADOPTION_KEEP_S]:
            del self._done[mid], self._done_at[mid]
        for builds in self._builds.values():
            for mid in [m for m, t in builds.items() if t < now - PARTIAL_WINDOW_S]:
                del builds[mid]
        if self._track:
            self._d_gc = now
        return removed

    def stats(self, now: float) -> dict[str, Any]:
        live: dict[bytes, tuple[int, int]] = {}
        for mid, sw in self._swarms.items():
            seeders = leechers = 0
            for m in sw.members.values():
                if m.expires > now:
                    if m.left == 0:
                        seeders += 1
                    else:
                        leechers += 1
            live[mid] = (seeders, leechers)
        adoption: dict[bytes, list[list[int]]] = {}
        for (mid, minute), n in sorted(self._adoption.items(), key=lambda kv: kv[0][1]):
            adoption.setdefault(mid, []).append([minute * 60, n])
        releases = []
        for mid, (app, completed, fp, fc, up) in self._releases.items():
            seeders, leechers = live.get(mid, (0, 0))
            releases.append(
                release_stats(mid, app, seeders, leechers, completed, fp, fc, up, adoption)
            )
        scores = [q.score for q in self._quality.values()]
        flagged = sorted(n.hex() for n, q in self._quality.items() if q.flagged)
        return {"releases": releases, "quality": quality_stats(scores, flagged)}

    def take_dirty(self) -> Dirty:
        """Everything changed since the last call, as rows (the write-behind's batch)."""
        out = Dirty(
            corrupt=self._d_corrupt, seen=self._d_seen, done=self._d_done, gc_before=self._d_gc
        )
        for mid, node in self._d_peers:
            sw = self._swarms.get(mid)
            m = sw.members.get(node) if sw is not None else None
            if m is None:
                out.peers_delete.append((mid, node))
            else:
                out.peers_upsert.append(m.row())
        for mid in self._d_releases:
            app, *counters = self._releases[mid]
            out.releases.append((mid, app, *counters))
        for key in self._d_adoption:
            n = self._adoption.get(key)
            if n is not None:
                out.adoption.append((key[0], key[1], n))
        for node in self._d_quality:
            q = self._quality.get(node)
            if q is None:
                out.quality_delete.append(node)
            else:
                out.quality_upsert.append(
                    (
                        node,
                        q.mib,
                        q.failures,
                        q.corrupt,
                        q.rate,
                        q.reports,
                        q.corrupt_reporters,
                        q.score,
                    )
                )
        self._d_peers, self._d_releases, self._d_adoption = set(), set(), set()
        self._d_quality, self._d_corrupt, self._d_seen, self._d_gc = set(), [], [], None
        self._d_done = []
        return out

    def close(self) -> None:
        """Nothing to release (subclasses flush here)."""


def _copy(q: PeerQuality) -> PeerQuality:
    return PeerQuality(q.mib, q.failures, q.corrupt, q.rate, q.reports, q.corrupt_reporters)
