"""The job queue: which jobs run, in what order, how many at once; and what survives a crash.

Theory of operation
-------------------
The queue is bookkeeping, like httpcore's pool assignment: calls change its state and
:meth:`Queue.next_actions` returns what the daemon must *do* (:class:`Start` a worker,
:class:`Stop` one, :class:`Discard` a partial stage) plus the time at which the queue next
wants to be asked again (a deferral running out). Nothing here sleeps, reads the clock or
touches an install: ``now`` is wall-clock seconds passed in (wall clock, not monotonic, because
a deferral "until tomorrow 08:00" must survive a restart), and whether an update window is
open is passed in too (``schedule.py`` answers that).

Ordering. Waiting jobs start in :meth:`Job.rank` order: critical updates first, then priority
(high, normal, low), then position (the order they were queued; "move to top" gives a job
priority high and the lowest position). At most ``max_active`` jobs hold a slot (downloading or
verifying). Priority orders the *waiting line*; it does not stop a running job. A critical
update does: if every slot is taken by non-critical jobs, the worst-ranked one is put back in
line (:class:`Stop`, state queued), which costs nothing but a reconnect because the stage
journal keeps every verified chunk. Lowering ``max_active`` preempts the same way.

Gates. A job waits, even at the head of the line, while it is deferred (``not_before`` in the
future) or while it is an automatic update (``auto``) and no update window is open. Critical
jobs pass both gates. Waiting on a gate does not block the jobs behind it.

Races. Workers report with the ``attempt`` they were started with (see :class:`Start`); a
report for another attempt is from a worker that was stopped and is ignored. ``finished`` is
accepted even after a pause or cancel of the same attempt: the switch happened, and the state
must not claim otherwise.

Persistence. :meth:`Queue.to_json` is the whole queue; the daemon saves it (atomically, by
``statedir.write_json``) after every change of state, and progress figures at most every few
seconds. :meth:`Queue.from_json` puts a job that was running when the process died back in
line as queued, with its progress: the stage journal on disk is the truth about which chunks
are done, so the restarted worker resumes without refetching. Ids are never reused, so
nothing is duplicated or confused on reload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .job import (
    ACTIVE,
    FINISHED,
    TRANSITIONS,
    Job,
    JobKind,
    JobState,
    JobStateError,
    Priority,
    Progress,
)
from .statedir import DamagedStateError, read_json, write_json

__all__ = [
    "MAX_FINISHED",
    "MAX_MAX_ACTIVE",
    "Action",
    "Discard",
    "Queue",
    "Start",
    "Stop",
    "Wanted",
    "check_max_active",
]

FORMAT = 1
# Finished jobs are kept as the update history the API shows; older ones are forgotten so the
# file does not grow for ever.
MAX_FINISHED = 200
MAX_MAX_ACTIVE = 64


def check_max_active(value: object, what: str) -> int:
    """``value`` as a number of concurrent jobs; digits in a string (from a command line) too.

    Raises:
        UsageError: naming ``what`` (the setting, and the file it came from).
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MAX_ACTIVE:
        raise UsageError(
            f"{what} {value!r} is not a number of jobs",
            fix=f"set max_active to a whole number from 1 to {MAX_MAX_ACTIVE}",
        )
    return value


@dataclass(frozen=True, slots=True)
class Start:
    """Run the job; tag every report with ``attempt``."""

    job: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the job's worker (pause, cancel, preemption); the verified chunks stay staged."""

    job: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Discard:
    """Delete the job's partial stage (after its worker has stopped): DEST stays as it was."""

    job: str


Action = Start | Stop | Discard


@dataclass(frozen=True, slots=True)
class Wanted:
    """What :meth:`Queue.next_actions` wants done, and when to ask again (None: only when
    something happens)."""

    actions: tuple[Action, ...]
    deadline: float | None


class Queue:
    """The jobs of one daemon.

    Args:
        max_active: how many jobs may hold a slot at once (1..64).
    """

    def __init__(self, max_active: int = 1) -> None:
        self._jobs: dict[str, Job] = {}
        self._next = 1
        self._position = 0  # the next position at the back of the line
        self._outbox: list[Action] = []
        self.max_active = max_active

    # Reading ----------------------------------------------------------------------------

    @property
    def max_active(self) -> int:
        return self._max_active

    @max_active.setter
    def max_active(self, n: int) -> None:
        self._max_active = check_max_active(n, "max_active")

    @property
    def jobs(self) -> list[Job]:
        """Every job, in the order they were made."""
        return list(self._jobs.values())

    def get(self, ident: str) -> Job:
        try:
            return self._jobs[ident]
        except KeyError:
            raise UsageError(f"no job {ident!r}", fix="list the jobs with `p2pnode jobs`") from None

    def active(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state in ACTIVE]

    def waiting(self) -> list[Job]:
        """The queued jobs in the order they would start (gates aside)."""
        return sorted((j for j in self._jobs.values() if j.state is JobState.QUEUED), key=Job.rank)

    def unfinished_for(self, entry: str) -> Job | None:
        for j in self._jobs.values():
            if j.entry == entry and j.state not in FINISHED:
                return j
        return None

    # The user --------------------------------------------------------------------------

    def submit(
        self,
        entry: str,
        kind: JobKind,
        *,
        now: float,
        target: str | None = None,
        priority: Priority = Priority.NORMAL,
        critical: bool = False,
        auto: bool = False,
    ) -> Job:
        """Queue a job, or fold a new update into the entry's unfinished update.

        One unfinished job per entry: two workers on one DEST would fight over its stage. A
        newer build announced while an update waits or runs replaces its target (and a
        critical one makes it critical); the worker picks the new target up when next started.

        Raises:
            JobStateError: the entry has an unfinished job of another kind.
        """
        if critical and kind is not JobKind.UPDATE:
            raise UsageError(
                f"a {kind.value} job cannot be critical", fix="only updates are critical"
            )
        existing = self.unfinished_for(entry)
        if existing is not None:
            if existing.kind is JobKind.UPDATE and kind is JobKind.UPDATE:
                existing.target = target if target is not None else existing.target
                existing.critical = existing.critical or critical
                existing.auto = existing.auto and auto  # a user's request is never gated
                if existing.critical:
                    existing.not_before = None
                return existing
            raise JobStateError(
                f"library entry {entry} already has job {existing.id} ({existing.kind.value}, "
                f"{existing.state.value})",
                fix=f"wait for job {existing.id}, or cancel it with `p2pnode cancel {existing.id}`",
            )
        job = Job(
            id=f"j{self._next}",
            entry=entry,
            kind=kind,
            created=now,
            position=self._back(),
            target=target,
            priority=priority,
            critical=critical,
            auto=auto,
        )
        self._next += 1
        self._jobs[job.id] = job
        return job

    def pause(self, ident: str) -> Job:
        return self._move(ident, "pause", "`p2pnode resume` a paused job, or cancel it")

    def resume(self, ident: str) -> Job:
        """Put a paused (or failed: a retry) job back in line, where it was."""
        job = self._move(ident, "resume", "only paused or failed jobs can be resumed")
        job.error = None
        return job

    def cancel(self, ident: str, *, now: float) -> Job:
        """Cancel a job; its partial stage is discarded (after its worker stops, if it runs)."""
        job = self._move(ident, "cancel", "the job has already finished; nothing to cancel")
        job.finished = now
        self._outbox.append(Discard(job.id))
        self._prune()
        return job

    def set_priority(self, ident: str, priority: Priority) -> Job:
        job = self._unfinished(ident, "change the priority of")
        job.priority = priority
        return job

    def move_to_top(self, ident: str) -> Job:
        """Make a job the next to start: priority high, ahead of every other high job (only a
        critical update still goes first)."""
        job = self._unfinished(ident, "move")
        job.priority = Priority.HIGH
        job.position = min((j.position for j in self._jobs.values()), default=0) - 1
        return job

    def defer(self, ident: str, until: float) -> Job:
        """Hold an update until ``until`` (wall-clock seconds; a time past lets it start now).

        Raises:
            JobStateError: not an update, or a critical one (those are never deferred).
        """
        job = self._unfinished(ident, "defer")
        if job.kind is not JobKind.UPDATE or job.critical:
            what = "a critical update" if job.critical else f"a {job.kind.value} job"
            raise JobStateError(
                f"job {ident} is {what}, which cannot be deferred",
                fix="pause it instead" if not job.critical else "critical updates install first",
            )
        job.not_before = until
        if job.state in ACTIVE:  # a deferral of a running update means "not now"
            self._preempt(job)
        return job

    def forget(self, ident: str) -> Job:
        """Drop a finished (installed or cancelled) job from the history."""
        job = self.get(ident)
        if job.state not in FINISHED:
            raise JobStateError(
                f"job {ident} is {job.state.value}, not finished",
                fix=f"cancel it first with `p2pnode cancel {ident}`",
            )
        del self._jobs[ident]
        return job

    # The worker -----------------------------------------------------------------------

    def report(
        self,
        ident: str,
        attempt: int,
        *,
        progress: Progress | None = None,
        phase: JobState | None = None,
    ) -> bool:
        """A running worker's progress and phase (downloading or verifying). Returns False,
        changing nothing, for a report that is stale (another attempt, or the job is no
        longer running)."""
        job = self._jobs.get(ident)
        if job is None or job.attempt != attempt or job.state not in ACTIVE:
            return False
        if phase is not None:
            if phase not in ACTIVE:
                raise ValueError(f"{phase} is not a phase; report the outcome with finished/failed")
            job.state = _to(job, phase.value)
        if progress is not None:
            job.progress = progress
        return True

    def finished(self, ident: str, attempt: int, *, now: float) -> bool:
        """The worker completed (the switch happened, or verify found or fixed everything)."""
        job = self._jobs.get(ident)
        if job is None or job.attempt != attempt or job.state not in TRANSITIONS["finished"]:
            return False
        job.state = JobState.INSTALLED
        job.finished = now
        job.error = None
        job.not_before = None
        if job.progress.bytes_total is not None:
            job.progress = job.progress.idle(bytes_done=job.progress.bytes_total)
        self._prune()
        return True

    def failed(self, ident: str, attempt: int, error: str) -> bool:
        """The worker gave up with ``error`` (the one-line message the user sees)."""
        job = self._jobs.get(ident)
        if job is None or job.attempt != attempt or job.state not in ACTIVE:
            return False
        job.state = JobState.FAILED
        job.error = error
        job.progress = job.progress.idle()
        return True

    # The decision ---------------------------------------------------------------------

    def next_actions(self, now: float, *, window_open: bool) -> Wanted:
        """Start what may start, stop what must stop; and when to ask again.

        Args:
            now: wall-clock seconds.
            window_open: whether an update window is open now (automatic updates start only
                then).
        """
        self._make_room_for_critical()
        excess = len(self.active()) - self._max_active
        if excess > 0:  # max_active was lowered
            for job in sorted(self.active(), key=Job.rank, reverse=True)[:excess]:
                self._preempt(job)
        free = self._max_active - len(self.active())
        deadline: float | None = None
        for job in self.waiting():
            if free <= 0:
                break
            gate = self._gate(job, now, window_open)
            if gate is False:
                continue
            if gate is not True:
                deadline = gate if deadline is None else min(deadline, gate)
                continue
            job.state = job.first_active
            job.attempt += 1
            self._outbox.append(Start(job.id, job.attempt))
            free -= 1
        actions, self._outbox = tuple(self._outbox), []
        # With no slot free, the next finish (an event) is what frees one, not a deferral.
        return Wanted(actions, deadline if free > 0 else None)

    @staticmethod
    def _gate(job: Job, now: float, window_open: bool) -> bool | float:
        """True: may start. False: waits for a window (the schedule's deadline, not ours).
        A float: deferred until then."""
        if job.critical:
            return True
        if job.not_before is not None and job.not_before > now:
            return job.not_before
        return window_open or not job.auto

    def _make_room_for_critical(self) -> None:
        waiting = [j for j in self.waiting() if j.critical]
        running = self.active()
        free = self._max_active - len(running)
        victims = sorted((j for j in running if not j.critical), key=Job.rank, reverse=True)
        for _ in range(max(0, len(waiting) - free)):
            if not victims:
                break
            self._preempt(victims.pop(0))

    def _preempt(self, job: Job) -> None:
        self._outbox.append(Stop(job.id, job.attempt))
        job.state = _to(job, "preempt")
        job.progress = job.progress.idle()

    # Helpers --------------------------------------------------------------------------

    def _move(self, ident: str, event: str, fix: str) -> Job:
        job = self.get(ident)
        was = job.state
        if was not in TRANSITIONS[event]:
            raise JobStateError(f"cannot {event} job {ident}: it is {was.value}", fix=fix)
        job.state = TRANSITIONS[event][was]
        if was in ACTIVE:
            self._outbox.append(Stop(job.id, job.attempt))
            job.progress = job.progress.idle()
        return job

    def _unfinished(self, ident: str, verb: str) -> Job:
        job = self.get(ident)
        if job.state in FINISHED:
            raise JobStateError(
                f"cannot {verb} job {ident}: it is {job.state.value}",
                fix="only unfinished jobs can be reordered or deferred",
            )
        return job

    def _back(self) -> int:
        self._position += 1
        return self._position

    def _prune(self) -> None:
        done = [j for j in self._jobs.values() if j.state in FINISHED]
        if len(done) > MAX_FINISHED:
            done.sort(key=lambda j: (j.finished or 0.0, int(j.id[1:])))
            for j in done[: len(done) - MAX_FINISHED]:
                del self._jobs[j.id]

    # Persistence ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "next_id": self._next,
            "position": self._position,
            "max_active": self._max_active,
            "jobs": [j.to_json() for j in self._jobs.values()],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: Path) -> Queue:
        """Rebuild a saved queue; running jobs come back queued (their workers died with the
        process that saved them), with their attempt counter, so nothing is lost or doubled.

        Raises:
            DamagedStateError: anything that is not a queue this module wrote.
        """
        if doc.get("format") != FORMAT:
            raise DamagedStateError(f"{path}: unknown queue format {doc.get('format')!r}")
        try:
            nxt, pos, raw = doc["next_id"], doc["position"], doc["jobs"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (nxt, pos)):
                raise ValueError("next_id and position must be integers")
            if not isinstance(raw, list):
                raise ValueError("jobs is not a list")
            queue = cls(doc["max_active"])
            queue._next, queue._position = nxt, pos
            queue._load_jobs(Job.from_json(item) for item in raw)
        except (KeyError, ValueError, UsageError) as exc:
            raise DamagedStateError(f"{path}: {exc}") from exc
        return queue

    def _load_jobs(self, jobs: Iterable[Job]) -> None:
        seen_entries: set[str] = set()
        for job in jobs:
            if job.id in self._jobs:
                raise ValueError(f"job {job.id} appears twice")
            if not job.id[1:].isdigit() or job.id[0] != "j" or int(job.id[1:]) >= self._next:
                raise ValueError(f"job id {job.id} is not one this queue handed out")
            if job.state not in FINISHED:
                if job.entry in seen_entries:
                    raise ValueError(f"entry {job.entry} has two unfinished jobs")
                seen_entries.add(job.entry)
            if job.state in ACTIVE:
                job.state = JobState.QUEUED
                job.progress = job.progress.idle()
            self._jobs[job.id] = job

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path, max_active: int = 1) -> Queue:
        """The queue saved at ``path``, or an empty one with ``max_active`` if there is none."""
        doc = read_json(path)
        return cls(max_active) if doc is None else cls.from_json(doc, path)


def _to(job: Job, event: str) -> JobState:
    table = TRANSITIONS[event]
    if job.state not in table:
        raise JobStateError(f"job {job.id} cannot go from {job.state.value} by {event}")
    return table[job.state]
