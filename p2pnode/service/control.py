"""The daemon's bookkeeping behind one door: library, queue and settings, saved and announced.

Why one class: the local API, the command line (through the API), the feed follower and the
workers all change the same three pieces of state, and each change must be checked, saved to
the state dir and pushed to whoever watches (the web page's stream, ``p2pnode jobs --watch``)
in that order, or a crash between two of them leaves the files disagreeing with what a client
was told. :class:`Service` does that for every change; callers never touch the cores directly.

It stays sans-IO apart from its files: no task, no socket, no sleeping. Time comes from the
``clock`` (wall-clock seconds, for the queue) and ``local_now`` (a naive local ``datetime``, for
the schedule) given to it, so tests drive it with fixed clocks. Watchers poll :attr:`version`
(it grows by one per change) or register a callback with :meth:`on_change`; the daemon's trio
shell turns that into an event to wake its loop and the push stream.

Progress reports change the version too (the page shows live rates) but are saved at most every
:data:`PROGRESS_SAVE_INTERVAL` seconds: a restart loses a few seconds of figures, never a chunk
(the stage journal is the truth about chunks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..errors import JobStateError, UsageError
from .job import ACTIVE, FINISHED, Job, JobKind, JobState, Priority, Progress
from .library import Entry, Library
from .move import check_target
from .queue import Queue, Wanted
from .schedule import Caps
from .settings import KEYS, Settings
from .statedir import StateDir

__all__ = ["PROGRESS_SAVE_INTERVAL", "Service", "parse_priority"]

#: Seconds between saves of progress-only changes.
PROGRESS_SAVE_INTERVAL = 5.0


def parse_priority(value: object) -> Priority:
    """``high``/``normal``/``low`` (any case) as the API and the command line spell them."""
    if isinstance(value, Priority):
        return value
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()]
    raise UsageError(f"{value!r} is not a priority", fix="use high, normal or low")


class Service:
    """Library, queue and settings of one state dir.

    Build it with :meth:`open` on a state dir the caller has locked (``StateDir.lock``); the
    lock is what makes this process the only writer of these files.

    Args:
        clock: wall-clock seconds (queue times, deferrals).
        local_now: the local time (schedules are in the user's local time).
    """

    def __init__(
        self,
        state: StateDir,
        library: Library,
        queue: Queue,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        local_now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.state = state
        self.library = library
        self.queue = queue
        self.settings = settings
        self.queue.max_active = settings.current.max_active
        self._clock = clock
        self._local_now = local_now
        self._version = 0
        self._listeners: list[Callable[[], None]] = []
        self._progress_saved = clock()
        self._progress_dirty = False
        # job id -> (entry id, DEST) whose partial stage its Discard removes, taken when the
        # job is cancelled: the entry may be removed (or the job forgotten) before the
        # daemon's loop carries the Discard out.
        self._discard_at: dict[str, tuple[str, str]] = {}

    @classmethod
    def open(
        cls,
        state: StateDir,
        table: dict[str, Any],
        where: str,
        *,
        clock: Callable[[], float] = time.time,
        local_now: Callable[[], datetime] = datetime.now,
    ) -> Service:
        """Load the state dir's files (missing ones start empty) under the config's table.

        Raises:
            DamagedStateError: a state file that is not what we wrote.
            UsageError: the config file's ``[service]`` table (with the saved overrides) is bad.
        """
        settings = Settings.load(table, where, state.settings)
        library = Library.load(state.library)
        queue = Queue.load(state.queue, settings.current.max_active)
        service = cls(state, library, queue, settings, clock=clock, local_now=local_now)
        for job in queue.jobs:  # a job whose entry is gone cannot run; say so, lose nothing
            if job.entry not in library and job.state not in FINISHED:
                queue.cancel(job.id, now=clock())
        return service

    # Watching ----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Grows by one on every change anyone could see."""
        return self._version

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change (it must not raise or block)."""
        self._listeners.append(callback)

    def _changed(self, *, save: bool = True) -> None:
        if save:
            self._save()
        else:
            self._progress_dirty = True
            if self._clock() - self._progress_saved >= PROGRESS_SAVE_INTERVAL:
                self._save_queue()
        self._version += 1
        for cb in self._listeners:
            cb()

    def _save(self) -> None:
        self.library.save(self.state.library)
        self.settings.save(self.state.settings)
        self._save_queue()

    def _save_queue(self) -> None:
        self.queue.save(self.state.queue)
        self._progress_saved = self._clock()
        self._progress_dirty = False

    def flush(self) -> None:
        """Save progress figures not yet saved (on shutdown)."""
        if self._progress_dirty:
            self._save_queue()

    # Reading -----------------------------------------------------------------------------

    def job_view(self, job: Job) -> dict[str, Any]:
        """A job as the API shows it: the saved fields plus the entry's app and DEST."""
        doc = job.to_json()
        entry = self.library.get(job.entry) if job.entry in self.library else None
        doc["app"] = entry.source if entry is not None else None
        doc["dest"] = entry.dest if entry is not None else None
        doc.update(
            bytes_done=job.progress.bytes_done,
            bytes_total=job.progress.bytes_total,
            rate=job.progress.rate,
        )
        return doc

    def jobs_view(self) -> list[dict[str, Any]]:
        """Unfinished jobs in the order they would run (active first), then history, newest
        first."""
        active = sorted(self.queue.active(), key=Job.rank)
        waiting = self.queue.waiting()
        others = [
            j
            for j in self.queue.jobs
            if j.state not in ACTIVE and j.state is not JobState.QUEUED and j.state not in FINISHED
        ]
        history = sorted(
            (j for j in self.queue.jobs if j.state in FINISHED),
            key=lambda j: j.finished or 0.0,
            reverse=True,
        )
        return [self.job_view(j) for j in [*active, *waiting, *others, *history]]

    def caps(self) -> Caps:
        """The download and upload caps in force now."""
        return self.settings.current.schedule.caps_at(self._local_now())

    def update_window_open(self) -> bool:
        return self.settings.current.schedule.update_window_open(self._local_now())

    def next_schedule_change(self) -> float | None:
        """Seconds from now until the caps or the update window next change (None: never)."""
        now = self._local_now()
        at = self.settings.current.schedule.next_change(now)
        return None if at is None else max(0.0, (at - now).total_seconds())

    def settings_view(self) -> dict[str, Any]:
        current = self.settings.current
        caps = self.caps()
        return {
            **current.to_config(),
            "overrides": sorted(self.settings.overrides),
            "caps_now": {"download": caps.download, "upload": caps.upload},
            "update_window_open": self.update_window_open(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything a client shows: the push stream sends this on every change."""
        return {
            "version": self._version,
            "entries": [e.to_json() for e in self.library.entries],
            "jobs": self.jobs_view(),
            "settings": self.settings_view(),
        }

    # The user ----------------------------------------------------------------------------

    def add(
        self,
        source: str,
        dest: str,
        trust: list[str] | tuple[str, ...],
        *,
        channel: str = "stable",
        tracker: str | None = None,
        auto_update: bool = True,
        priority: Priority = Priority.NORMAL,
    ) -> tuple[Entry, Job]:
        """Add a game and queue its install; nothing changes if either is refused."""
        now = self._clock()
        entry = self.library.add(
            source, dest, trust, now=now, channel=channel, tracker=tracker, auto_update=auto_update
        )
        job = self.queue.submit(entry.id, JobKind.INSTALL, now=now, priority=priority)
        self._changed()
        return entry, job

    def remove(self, entry_id: str) -> Entry:
        """Forget a game (its files stay where they are).

        Raises:
            JobStateError: it has an unfinished job (cancel it first).
        """
        job = self.queue.unfinished_for(entry_id)
        if job is not None:
            raise JobStateError(
                f"library entry {entry_id} has job {job.id} ({job.state.value})",
                fix=f"cancel it first with `p2pnode cancel {job.id}`",
            )
        entry = self.library.remove(entry_id)
        self._changed()
        return entry

    def move(self, entry_id: str, to: str, *, priority: Priority = Priority.NORMAL) -> Job:
        """Queue a move of an installed game (its files and the user's) to the new DEST ``to``.

        Refused at once, changing nothing, for a target that is not a new or empty directory,
        lies in or around the install or another entry's DEST, or for an entry with an
        unfinished job; the worker checks again, and checks the space (service/move.py).
        """
        entry = self.library.get(entry_id)
        to = self.library.check_dest(entry_id, to)
        if self.queue.unfinished_for(entry_id) is None:  # else submit says which job is in the way
            check_target(entry.dest, to)
        job = self.queue.submit(
            entry_id, JobKind.MOVE, now=self._clock(), target=to, priority=priority
        )
        self._changed()
        return job

    def relocate(self, entry_id: str, dest: str) -> Entry:
        """Point an entry at the place a move put its install (the move's switch)."""
        entry = self.library.set_dest(entry_id, dest)
        self._changed()
        return entry

    def set_auto_update(self, entry_id: str, on: bool) -> Entry:
        entry = self.library.set_auto_update(entry_id, on)
        self._changed()
        return entry

    def submit(
        self,
        entry_id: str,
        kind: JobKind,
        *,
        target: str | None = None,
        priority: Priority = Priority.NORMAL,
        critical: bool = False,
        auto: bool = False,
    ) -> Job:
        """Queue a job for a library entry (an update announced by the feed: ``auto=True``)."""
        self.library.get(entry_id)  # a clear error for an unknown entry
        job = self.queue.submit(
            entry_id,
            kind,
            now=self._clock(),
            target=target,
            priority=priority,
            critical=critical,
            auto=auto,
        )
        self._changed()
        return job

    def pause(self, job_id: str) -> Job:
        job = self.queue.pause(job_id)
        self._changed()
        return job

    def resume(self, job_id: str) -> Job:
        job = self.queue.resume(job_id)
        self._changed()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.queue.cancel(job_id, now=self._clock())
        if job.entry in self.library and job.kind is not JobKind.MOVE:  # a move undoes itself
            self._discard_at[job.id] = (job.entry, self.library.get(job.entry).dest)
        self._changed()
        return job

    def discard_dest(self, job_id: str) -> tuple[str, str] | None:
        """The entry and DEST a cancelled job's ``Discard`` cleans (once: the daemon takes
        it), even if the entry was removed or the job forgotten meanwhile; None if there is
        nothing to clean."""
        return self._discard_at.pop(job_id, None)

    def set_priority(self, job_id: str, priority: Priority | str) -> Job:
        """``top`` moves the job ahead of every other (only a critical update goes first)."""
        if priority == "top":
            job = self.queue.move_to_top(job_id)
        else:
            job = self.queue.set_priority(job_id, parse_priority(priority))
        self._changed()
        return job

    def defer(self, job_id: str, until: float) -> Job:
        job = self.queue.defer(job_id, until)
        self._changed()
        return job

    def forget(self, job_id: str) -> Job:
        job = self.queue.forget(job_id)
        self._changed()
        return job

    def set_setting(self, key: str, value: Any) -> dict[str, Any]:
        """Change one setting (checked as a fresh start would check it); returns the view."""
        current = self.settings.set(key, value)
        self.queue.max_active = current.max_active
        self._changed()
        return self.settings_view()

    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change several settings, all or none (None resets a key); returns the view."""
        current = self.settings.update(changes)
        self.queue.max_active = current.max_active
        self._changed()
        return self.settings_view()

    def reset_setting(self, key: str) -> dict[str, Any]:
        if key not in KEYS:
            raise UsageError(f"{key!r} is not a setting", fix=f"use one of {', '.join(KEYS)}")
        current = self.settings.reset(key)
        self.queue.max_active = current.max_active
        self._changed()
        return self.settings_view()

    # The workers -------------------------------------------------------------------------

    def report(
        self,
        job_id: str,
        attempt: int,
        *,
        progress: Progress | None = None,
        phase: JobState | None = None,
    ) -> bool:
        """A worker's progress or phase; False (nothing changed) for a stale report."""
        try:
            job = self.queue.get(job_id)
        except UsageError:  # forgotten while its worker still ran: stale
            return False
        before = job.state
        if not self.queue.report(job_id, attempt, progress=progress, phase=phase):
            return False
        self._changed(save=job.state is not before)
        return True

    def finished(self, job_id: str, attempt: int) -> bool:
        if not self.queue.finished(job_id, attempt, now=self._clock()):
            return False
        self._changed()
        return True

    def failed(self, job_id: str, attempt: int, error: str) -> bool:
        if not self.queue.failed(job_id, attempt, error):
            return False
        self._changed()
        return True

    # The daemon's loop -------------------------------------------------------------------

    def next_actions(self) -> Wanted:
        """What to start, stop and discard now (saved first: a crash after this call must
        find the attempts the workers are about to be started with)."""
        wanted = self.queue.next_actions(self._clock(), window_open=self.update_window_open())
        if wanted.actions:
            self._changed()
        return wanted
