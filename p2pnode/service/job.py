"""A job of the client service and the one table of its legal state changes.

Like h11's ``_state.py``, every transition lives in one table, stored as data
(:data:`TRANSITIONS`), and anything not in it raises :class:`JobStateError`. The table is
drawn in ``docs/service.md``; the queue (``queue.py``) is the only code that applies it.

Who moves a job, and why the table is split that way:

* the **user** (through the API): pause, resume, cancel. These must be refusable with a reason
  ("job j3 is installed"), so they raise on an illegal state.
* the **queue** itself: start a queued job when a slot is free, put a running job back in line
  when a critical update needs its slot (preempt) or the daemon restarts.
* the **worker** running the job (the daemon's trio task): it reports phases and the outcome.
  Its reports can race with the user (a worker finishing while the user presses pause), so
  each report carries the ``attempt`` it was started with and a stale one is ignored, not an
  error: see :meth:`p2pnode.service.queue.Queue.report`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

from ..errors import JobStateError

__all__ = [
    "ACTIVE",
    "FINISHED",
    "TRANSITIONS",
    "Job",
    "JobKind",
    "JobState",
    "JobStateError",
    "Priority",
    "Progress",
]


class JobKind(enum.Enum):
    INSTALL = "install"
    UPDATE = "update"
    VERIFY = "verify"  # verify, and repair what is damaged
    MOVE = "move"  # move an install to another DEST


class JobState(enum.Enum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    PAUSED = "paused"
    VERIFYING = "verifying"
    INSTALLED = "installed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The states that hold one of the queue's ``max_active`` slots.
ACTIVE = frozenset({JobState.DOWNLOADING, JobState.VERIFYING})
# The states nothing leaves (except by forgetting the job).
FINISHED = frozenset({JobState.INSTALLED, JobState.CANCELLED})


class Priority(enum.IntEnum):
    """Lower values start first; stored by name so the file survives a renumbering."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


S = JobState
# event -> {from state: to state}. ``start`` goes to VERIFYING for a verify job
# (Job.first_active).
TRANSITIONS: dict[str, dict[JobState, JobState]] = {
    # user
    "pause": {S.QUEUED: S.PAUSED, S.DOWNLOADING: S.PAUSED, S.VERIFYING: S.PAUSED},
    "resume": {S.PAUSED: S.QUEUED, S.FAILED: S.QUEUED},
    "cancel": {
        S.QUEUED: S.CANCELLED,
        S.DOWNLOADING: S.CANCELLED,
        S.VERIFYING: S.CANCELLED,
        S.PAUSED: S.CANCELLED,
        S.FAILED: S.CANCELLED,
    },
    # queue
    "start": {S.QUEUED: S.DOWNLOADING},
    "preempt": {S.DOWNLOADING: S.QUEUED, S.VERIFYING: S.QUEUED},
    # worker
    "downloading": {S.VERIFYING: S.DOWNLOADING, S.DOWNLOADING: S.DOWNLOADING},
    "verifying": {S.DOWNLOADING: S.VERIFYING, S.VERIFYING: S.VERIFYING},
    # A worker that finished before it saw the pause or cancel did finish: the tree is switched,
    # and the state must say so rather than claim DEST is as it was.
    "finished": {
        S.DOWNLOADING: S.INSTALLED,
        S.VERIFYING: S.INSTALLED,
        S.PAUSED: S.INSTALLED,
        S.CANCELLED: S.INSTALLED,
    },
    "failed": {S.DOWNLOADING: S.FAILED, S.VERIFYING: S.FAILED},
}
del S


@dataclass(frozen=True, slots=True)
class Progress:
    """What a worker last reported; carried as data for the API and the web page.

    ``by_source`` counts bytes by where they came from (``"cdn"``, ``"peers"``, ``"local"``),
    the split players and operators ask about first; ``peers`` how many peers the job's build
    is exchanged with now (fetched from, or served to, by the daemon's node).
    """

    bytes_done: int = 0
    bytes_total: int | None = None
    rate: float = 0.0
    by_source: tuple[tuple[str, int], ...] = ()
    peers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate": self.rate,
            "by_source": dict(self.by_source),
            "peers": self.peers,
        }

    def idle(self, **changes: Any) -> Progress:
        """These figures once the job's worker stopped: no rate, no peers (and ``changes``)."""
        return replace(self, rate=0.0, peers=0, **changes)

    @classmethod
    def from_json(cls, doc: Any) -> Progress:
        if not isinstance(doc, dict):
            raise ValueError("progress is not an object")
        done, total, rate, src = (
            doc.get(k) for k in ("bytes_done", "bytes_total", "rate", "by_source")
        )
        if not _count(done) or not (total is None or _count(total)):
            raise ValueError("progress byte counts are not counts")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise ValueError("progress rate is not a non-negative number")
        if not isinstance(src, dict) or not all(
            isinstance(k, str) and _count(v) for k, v in src.items()
        ):
            raise ValueError("progress by_source is not a table of byte counts")
        # (``peers`` is not read back: a count saved before a restart says nothing now.)
        return cls(done, total, float(rate), tuple(sorted(src.items())))


def _count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(slots=True)
class Job:
    """One piece of work on one library entry.

    Args:
        id: ``j1``, ``j2``, ... never reused.
        entry: the library entry's id.
        target: what the job goes to: a build or manifest id for install and update, the new
            DEST for a move; None where the worker finds out (the channel's latest).
        critical: a critical update: it starts before everything else, takes a slot from a
            non-critical job if none is free, and ignores update windows and deferral.
        auto: made by the daemon (auto-update), not asked for by the user: it starts only
            inside an update window.
        position: the order among jobs of equal priority; lower starts first.
        not_before: a deferred job starts no earlier than this (wall-clock seconds).
        attempt: counts starts, so a report from an earlier start is told apart.
    """

    id: str
    entry: str
    kind: JobKind
    created: float
    position: int
    target: str | None = None
    priority: Priority = Priority.NORMAL
    critical: bool = False
    auto: bool = False
    state: JobState = JobState.QUEUED
    not_before: float | None = None
    attempt: int = 0
    progress: Progress = field(default_factory=Progress)
    error: str | None = None
    finished: float | None = None

    @property
    def first_active(self) -> JobState:
        return JobState.VERIFYING if self.kind is JobKind.VERIFY else JobState.DOWNLOADING

    def rank(self) -> tuple[bool, int, int]:
        """The order the queue starts waiting jobs in: critical first, then priority, then
        position."""
        return (not self.critical, int(self.priority), self.position)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "entry": self.entry,
            "kind": self.kind.value,
            "created": self.created,
            "position": self.position,
            "target": self.target,
            "priority": self.priority.name.lower(),
            "critical": self.critical,
            "auto": self.auto,
            "state": self.state.value,
            "not_before": self.not_before,
            "attempt": self.attempt,
            "progress": self.progress.to_json(),
            "error": self.error,
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Job:
        """Read a saved job back; raises ValueError (or KeyError) on anything we did not write."""
        if not isinstance(doc, dict):
            raise ValueError("a job is not an object")
        ident, entry, target, error = (doc.get(k) for k in ("id", "entry", "target", "error"))
        if not isinstance(ident, str) or not isinstance(entry, str):
            raise ValueError("a job has no id or entry")
        if not (target is None or isinstance(target, str)) or not (
            error is None or isinstance(error, str)
        ):
            raise ValueError(f"job {ident}: target and error must be strings")
        created, position, attempt = doc.get("created"), doc.get("position"), doc.get("attempt")
        if not _number(created) or not isinstance(position, int) or not _count(attempt):
            raise ValueError(f"job {ident}: created, position or attempt is not a number")
        not_before, finished = doc.get("not_before"), doc.get("finished")
        if not (not_before is None or _number(not_before)) or not (
            finished is None or _number(finished)
        ):
            raise ValueError(f"job {ident}: not_before or finished is not a time")
        critical, auto = doc.get("critical"), doc.get("auto")
        if not isinstance(critical, bool) or not isinstance(auto, bool):
            raise ValueError(f"job {ident}: critical and auto must be true or false")
        priority = doc.get("priority")
        if not isinstance(priority, str):
            raise ValueError(f"job {ident}: priority is not a name")
        return cls(
            id=ident,
            entry=entry,
            kind=JobKind(doc.get("kind")),
            created=float(created),
            position=position,
            target=target,
            priority=Priority[priority.upper()],
            critical=critical,
            auto=auto,
            state=JobState(doc.get("state")),
            not_before=None if not_before is None else float(not_before),
            attempt=attempt,
            progress=Progress.from_json(doc.get("progress")),
            error=error,
            finished=None if finished is None else float(finished),
        )


def _number(v: object) -> TypeGuard[float]:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    )
