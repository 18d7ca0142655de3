"""The decisions of the CDN fetcher, without IO: what to request, from which mirror, how much.

Theory of operation
-------------------
The installer hands :class:`FetchPlan` a list of :class:`ChunkRequest` (a chunk id and where it
sits in a release file). The trio shell in :mod:`p2pnode.cdn.fetcher` runs a fixed number of
workers;
each asks :meth:`FetchPlan.next_action` for work and gets one of

* :class:`Job`: "GET bytes ``start..end`` of ``path`` from ``mirror``"; the byte range is a run of
  chunks adjacent in the file (coalesced), cut to a size the plan picks;
* :class:`Wait`: nothing to do until ``until`` (a backoff or a cooldown ends) or until the plan
  changes (``until is None``);
* :data:`DONE`: every chunk was delivered or given up on.

and reports back what happened (:meth:`FetchPlan.job_bytes`, :meth:`chunk_ok`,
:meth:`chunk_bad`, :meth:`job_finished`). Time is always passed in as ``now``.

**Range sizing.** What a server has pushed into sockets, or the process holds in half-received
chunks, but has not yet verified
is lost if the process dies, so the plan bounds *bytes requested but not yet received* by a
budget proportional to the download rate (``rate * target_seconds``, the measured rate, or the
cap when one is set) instead of ``connections * max_range_bytes``. It starts small
(``initial_budget``) and grows with the measured rate. Each request is cut to
``budget / connections`` (at least one chunk, at most ``max_range_bytes``); a new request is
admitted only when it fits in what is left of the budget, or when nothing is in flight.

**Failures.** A failed job hands back its unfinished chunks. Each chunk counts its attempts over
all mirrors (``max_attempts``) and remembers, per mirror, why it failed there (for the one-line
error). A chunk that failed on a mirror may not return to *that* mirror before an exponential
backoff with full jitter has passed, but any other mirror may take it at once: failover is
immediate, hammering is not. Bytes that fail blake3 exclude that mirror for that chunk for good;
a 404, 416 or a size mismatch excludes the mirror for the whole file. A chunk that no mirror
may serve any more, or that ran out of attempts, is *failed*; the rest go on, so everything that
can be delivered is before :class:`p2pnode.cdn.fetcher.CDNFetcher` raises.

**Mirror health.** :class:`MirrorHealth` counts consecutive failures; past a threshold a mirror
sits out a cooldown that doubles each time (with jitter). Healthy mirrors come first, then
mirrors that honour Range, then the least loaded, then the fastest.

**Mirrors that ignore Range.** Until a mirror has answered once (or a request to it ended),
it gets at most one request per file at a time, so a mirror that answers 200 (the whole file)
to every range costs one whole-file body per file, not one per range in flight. A job answered
with 200 becomes its file's *stream* (:meth:`FetchPlan.stream_whole_file`): the shell reads the
body once, and :meth:`FetchPlan.next_in_stream` hands it, as the body passes each offset, the
next chunk of that file still wanted from this mirror (claimed from the queue just in time), so
every pending chunk of the file is kept from that one body and nothing else of the file is
asked of that mirror meanwhile. A second 200 for a file already streaming gives its chunks back.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .health import MirrorHealth, RateMeter, backoff_delay
from .ranges import ChunkRequest, coalesce, parse_content_range

__all__ = [
    "DONE",
    "PERMANENT_FOR_FILE",
    "ChunkRequest",
    "FetchPlan",
    "Job",
    "MirrorHealth",
    "PlanParams",
    "RateMeter",
    "Wait",
    "backoff_delay",
    "coalesce",
    "parse_content_range",
]


# --------------------------------------------------------------------------------------------
# Coalescing


# --------------------------------------------------------------------------------------------
# Rates, backoff, health


# --------------------------------------------------------------------------------------------
# The plan


#: Failure kinds after which a mirror is not asked for the same file again (it lacks the file,
#: or has another version of it): retrying there cannot help.
PERMANENT_FOR_FILE = frozenset(
    {"http_404", "http_410", "http_403", "http_416", "size_mismatch", "not_found"}
)

#: Failure kinds that mean the mirror cannot be reached at all: cool it down at once.
UNREACHABLE = frozenset({"connect"})


@dataclass(frozen=True)
class PlanParams:
    """What :class:`FetchPlan` decides by. Durations are seconds, sizes bytes.

    Attributes:
        connections: concurrent requests over all mirrors (the HTTP pool's size).
        max_download_rate: bytes/s over all connections; None = unlimited.
        max_range_bytes: the most one coalesced range request asks for.
        max_attempts: per chunk, over all mirrors, before it is given up.
        target_seconds: requested-but-unreceived bytes are bounded by this many seconds of
            transfer at the current rate (caps what a killed process loses).
        initial_budget, max_budget: that bound before the rate is known, and its ceiling.
        min_budget: its floor once the rate is known (never above ``initial_budget``).
        retry_base, retry_cap: exponential backoff with full jitter before a chunk returns
            to a mirror that failed it.
        failure_threshold, cooldown_base, cooldown_cap: consecutive failures that put a mirror
            on cooldown, and the cooldown's first length and ceiling (doubling).
    """

    connections: int = 8
    max_download_rate: float | None = None
    max_range_bytes: int = 16 * 2**20
    max_attempts: int = 6
    target_seconds: float = 0.25
    initial_budget: int = 4 * 2**20
    min_budget: int = 512 * 1024
    max_budget: int = 64 * 2**20
    retry_base: float = 0.2
    retry_cap: float = 10.0
    failure_threshold: int = 2
    cooldown_base: float = 1.0
    cooldown_cap: float = 30.0


class _Item:
    """Book-keeping for one requested chunk."""

    __slots__ = ("attempts", "excluded", "reasons", "req", "retry_at", "state")

    def __init__(self, req: ChunkRequest) -> None:
        self.req = req
        self.attempts = 0
        self.state = "pending"  # pending | active | ok | failed
        self.retry_at: dict[int, float] = {}  # mirror -> earliest retry there
        self.excluded: set[int] = set()  # mirrors that served bytes failing blake3
        self.reasons: dict[int, str] = {}  # mirror -> last failure there


@dataclass(eq=False)
class Job:
    """One range request: chunks ``items`` of ``path``, bytes ``start..end`` from ``mirror``."""

    mirror: int
    url: str
    path: str
    items: list[_Item]
    started: float
    received: int = 0
    settled: int = 0  # bytes of chunks delivered or rejected
    finished: set[_Item] = field(default_factory=set)  # items delivered or rejected

    @property
    def start(self) -> int:
        return self.items[0].req.offset

    @property
    def end(self) -> int:
        return self.items[-1].req.end

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def requested(self) -> int:
        """Bytes of the job's chunks (less than ``length`` for a stream with gaps)."""
        return sum(it.req.length for it in self.items)

    @property
    def chunks(self) -> list[ChunkRequest]:
        return [it.req for it in self.items]


@dataclass(frozen=True)
class Wait:
    until: float | None  # None: until the plan changes


class _Done:
    def __repr__(self) -> str:
        return "DONE"


DONE = _Done()


class FetchPlan:
    """The scheduler behind :class:`p2pnode.cdn.fetcher.CDNFetcher`; see the module docstring."""

    def __init__(
        self,
        requests: Iterable[ChunkRequest],
        mirrors: Sequence[str],
        params: PlanParams,
        *,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.p = params
        self._rng = rng or random.Random()
        self.health = MirrorHealth(
            mirrors,
            failure_threshold=params.failure_threshold,
            cooldown_base=params.cooldown_base,
            cooldown_cap=params.cooldown_cap,
            rng=self._rng,
        )
        unique = dict.fromkeys(requests)  # identical requests are fetched and delivered once
        self.items = [_Item(r) for r in unique]
        self._pending: dict[str, list[tuple[int, int, _Item]]] = {}
        self._paths: deque[str] = deque()
        for n, it in enumerate(self.items):
            self._pending.setdefault(it.req.path, []).append((it.req.offset, n, it))
        for path, lst in sorted(self._pending.items()):
            lst.sort(key=lambda e: (e[0], e[1]))
            self._paths.append(path)
        self._seq = {id(it): n for n, it in enumerate(self.items)}
        self._file_excluded: set[tuple[int, str]] = set()
        self._file_reasons: dict[tuple[int, str], str] = {}
        self.unresolved = len(self.items)
        self.active: set[Job] = set()
        self.inflight = 0  # bytes requested and not yet verified
        self.meter = RateMeter(window=1.0, slots=10, now=now)
        self.retries = 0
        self.failed: list[_Item] = []
        self._open: dict[tuple[int, str], int] = {}  # (mirror, path) -> active jobs
        self._streams: dict[tuple[int, str], Job] = {}  # (mirror, path) -> its whole-file job

    # -- sizing ------------------------------------------------------------------------------

    def budget(self, now: float) -> int:
        """Bytes that may be requested and not yet verified, over all connections."""
        p = self.p
        measured = self.meter.rate(now)
        if p.max_download_rate is not None:
            rate = p.max_download_rate
        elif now - self.meter.started < 0.2 or measured <= 0:
            return p.initial_budget
        else:
            rate = measured * 1.5  # headroom, so the budget can grow with a faster link
        floor = min(p.min_budget, p.initial_budget)
        return int(min(p.max_budget, max(floor, rate * p.target_seconds)))

    def target_request(self, now: float) -> int:
        budget = self.budget(now)
        per = budget // max(1, self.p.connections)
        target = min(self.p.max_range_bytes, max(256 * 1024, per))
        if self.inflight:
            target = min(target, budget - self.inflight)
        return target

    # -- work --------------------------------------------------------------------------------

    def next_action(self, now: float) -> Job | Wait | _Done:
        if self.unresolved == 0 and not self.active:
            return DONE
        if not any(self._pending.values()):
            return Wait(None)
        budget = self.budget(now)
        if self.inflight and self.inflight >= budget:
            return Wait(None)
        target = self.target_request(now)
        for m in self.health.order(now):
            job = self._take(m, now, max(1, target))
            if job is not None:
                key = (m, job.path)
                self._open[key] = self._open.get(key, 0) + 1
                self.active.add(job)
                self.inflight += job.length
                self.health.started(m)
                return job
        return Wait(self._next_eligible(now))

    def _eligible(self, it: _Item, m: int, now: float) -> bool:
        return m not in it.excluded and it.retry_at.get(m, float("-inf")) <= now

    def _held(self, m: int, path: str) -> bool:
        """No new job for ``path`` on mirror ``m`` now: the file is streaming from it, or the
        mirror has not answered yet (it may ignore Range) and already has a job for it."""
        key = (m, path)
        return key in self._streams or (not self.health.answered(m) and self._open.get(key, 0) > 0)

    def _take(self, m: int, now: float, target: int) -> Job | None:
        for _ in range(len(self._paths)):
            path = self._paths[0]
            self._paths.rotate(-1)  # spread requests over files (and so over mirrors' disks)
            lst = self._pending.get(path)
            if not lst or (m, path) in self._file_excluded or self._held(m, path):
                continue
            k = next((k for k, e in enumerate(lst) if self._eligible(e[2], m, now)), -1)
            if k < 0:
                continue
            first = lst[k][2]
            taken = [first]
            size = first.req.length
            j = k + 1
            while j < len(lst):
                nxt = lst[j][2]
                if (
                    nxt.req.offset != taken[-1].req.end
                    or size + nxt.req.length > target
                    or not self._eligible(nxt, m, now)
                ):
                    break
                taken.append(nxt)
                size += nxt.req.length
                j += 1
            del lst[k:j]
            for it in taken:
                it.state = "active"
            return Job(m, self.health.url(m), path, taken, now)
        return None

    def _next_eligible(self, now: float) -> float | None:
        """When waiting could end: the earliest retry time or cooldown end that unblocks a
        pending chunk; None if only a change in the plan (a job finishing) can."""
        best: float | None = None
        for path, lst in self._pending.items():
            for _, _, it in lst:
                for m in range(len(self.health)):
                    if m in it.excluded or (m, path) in self._file_excluded:
                        continue
                    if self._held(m, path):
                        continue  # until that job ends: a change in the plan
                    t = max(it.retry_at.get(m, now), self.health.cooldown_until(m))
                    if best is None or t < best:
                        best = t
        if best is not None and best <= now:
            return now
        return best

    def _requeue(self, it: _Item) -> None:
        it.state = "pending"
        lst = self._pending.setdefault(it.req.path, [])
        bisect.insort(lst, (it.req.offset, self._seq[id(it)], it), key=lambda e: (e[0], e[1]))
        if it.req.path not in self._paths:
            self._paths.append(it.req.path)

    def _fail(self, it: _Item) -> None:
        it.state = "failed"
        self.failed.append(it)
        self.unresolved -= 1

    def _hopeless(self, it: _Item) -> bool:
        return all(
            m in it.excluded or (m, it.req.path) in self._file_excluded
            for m in range(len(self.health))
        )

    # -- reports from the shell --------------------------------------------------------------

    def answered(self, job: Job, *, honoured_range: bool) -> None:
        """``job``'s mirror answered (206: ``honoured_range``; 200: it sent the whole file)."""
        self.health.mark_answered(job.mirror)
        if not honoured_range:
            self.health.mark_ignores_range(job.mirror)

    def stream_whole_file(self, job: Job) -> bool:
        """``job`` was answered with the whole file: make it the file's stream on its mirror.
        False if another job already streams that file from there; ``job`` should then end
        at once (its chunks go back to the queue for the stream to claim)."""
        key = (job.mirror, job.path)
        if key in self._streams:
            return False
        self._streams[key] = job
        return True

    def next_in_stream(self, job: Job, pos: int) -> ChunkRequest | None:
        """The next chunk at or after byte ``pos`` that ``job``'s whole-file body should be
        kept for: its own, or one still queued for that file (claimed for ``job`` now).
        None: nothing more is wanted from the rest of the body."""
        items = job.items  # sorted by offset
        k = bisect.bisect_left(items, pos, key=lambda i: i.req.offset)
        own = items[k] if k < len(items) else None
        lst = self._pending.get(job.path, [])
        # Backoffs are not checked: this mirror is sending the bytes anyway.
        for k in range(bisect.bisect_left(lst, pos, key=lambda e: e[0]), len(lst)):
            offset, _, it = lst[k]
            if own is not None and offset > own.req.offset:
                break
            if job.mirror in it.excluded:
                continue
            del lst[k]
            it.state = "active"
            bisect.insort(job.items, it, key=lambda i: i.req.offset)
            self.inflight += it.req.length
            return it.req
        return own.req if own is not None else None

    def job_bytes(self, job: Job, n: int, now: float) -> None:
        """``n`` body bytes of ``job`` arrived. They stay in the in-flight budget until their
        chunk is verified: bytes of a half-received chunk are lost to a killed process just
        like bytes still in a socket, so the budget bounds both together."""
        self.meter.add(n, now)
        job.received += n

    def chunk_ok(self, job: Job, req: ChunkRequest) -> _Item:
        k = self._index(job, req)
        it = job.items[k]
        job.finished.add(it)
        job.settled += req.length
        self.inflight -= req.length
        it.state = "ok"
        self.unresolved -= 1
        return it

    def chunk_bad(self, job: Job, req: ChunkRequest, now: float) -> None:
        """The mirror served bytes for ``req`` that fail blake3: never ask it for them again."""
        k = self._index(job, req)
        it = job.items[k]
        job.finished.add(it)
        job.settled += req.length
        self.inflight -= req.length
        it.excluded.add(job.mirror)
        it.reasons[job.mirror] = "served bytes that fail blake3"
        it.attempts += 1
        self._retry_or_fail(it)

    def _retry_or_fail(self, it: _Item) -> None:
        if it.attempts >= self.p.max_attempts or self._hopeless(it):
            self._fail(it)
        else:
            self.retries += 1
            self._requeue(it)

    def job_finished(
        self, job: Job, now: float, *, kind: str | None = None, detail: str = ""
    ) -> list[ChunkRequest]:
        """End ``job``: ``kind`` names the failure (None for success). Chunks the job did not
        finish go back to the queue (or fail). Returns the chunks that failed for good."""
        self.active.discard(job)
        self.health.stopped(job.mirror)
        # Hold back no longer: a mirror that fails before answering (refused, reset) would
        # otherwise be probed one request per file per cooldown.
        self.health.mark_answered(job.mirror)
        key = (job.mirror, job.path)
        self._open[key] -= 1
        if self._streams.get(key) is job:
            del self._streams[key]
        self.inflight -= job.requested - job.settled
        failed_before = len(self.failed)
        if kind is None:
            self.health.success(job.mirror, job.received, now - job.started)
        else:
            self.health.failure(job.mirror, now, immediate=kind in UNREACHABLE)
            if kind in PERMANENT_FOR_FILE:
                self._file_excluded.add((job.mirror, job.path))
                self._file_reasons[(job.mirror, job.path)] = detail or kind
        for it in job.items:
            if it in job.finished:
                continue
            if kind is None:
                # Success without this chunk: the shell ended the body early on purpose (a
                # second whole-file answer for a file already streaming); give it back
                # without charging an attempt.
                self._requeue(it)
                continue
            it.attempts += 1
            it.reasons[job.mirror] = detail or kind
            it.retry_at[job.mirror] = now + backoff_delay(
                it.attempts, self.p.retry_base, self.p.retry_cap, self._rng
            )
            self._retry_or_fail(it)
        if kind in PERMANENT_FOR_FILE:
            # Other pending chunks of the same file may have just become hopeless.
            lst = self._pending.get(job.path, [])
            for entry in list(lst):
                it = entry[2]
                if self._hopeless(it):
                    lst.remove(entry)
                    it.reasons.setdefault(job.mirror, detail or kind)
                    self._fail(it)
        return [it.req for it in self.failed[failed_before:]]

    def _index(self, job: Job, req: ChunkRequest) -> int:
        for k, it in enumerate(job.items):
            if it.req is req:
                return k
        raise RuntimeError("chunk does not belong to this job")

    def reasons(self, it: _Item) -> dict[str, str]:
        """Why ``it`` could not be had, per mirror URL."""
        out: dict[str, str] = {}
        for m in range(len(self.health)):
            why = it.reasons.get(m) or self._file_reasons.get((m, it.req.path))
            if why:
                out[self.health.url(m)] = why
        return out
