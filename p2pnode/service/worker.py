"""A job's worker: one install, update or verify(+repair) of a library entry, as a trio task.

The worker is the node's own install machinery (``node/install.py``, ``node/verify.py``) run
with the daemon's knobs: the global download and upload limiters every job, peer link and CDN
fetch share; the daemon's one swarm node, which the install fetches through and serves what it
stages from (``InstallOptions.node``: the identity, connections and port of the daemon); the
daemon's one discovery, whose DHT node and LAN the install's peer search asks beside the
entry's tracker (``InstallOptions.shared_discovery``); and two hooks the standalone verbs do
not use (``InstallOptions.watch_result`` for live bytes by source, ``before_switch`` for the
launcher lock). It reports to :class:`~p2pnode.service.control.Service` only: progress and
phase while it runs, then ``finished`` or ``failed`` with a one-line message that carries the
fix.

Stopping is trio cancellation of the worker's scope, nothing more: every chunk is journaled as
it is written (``disk/stage.py``), so the next ``Start`` of the job resumes from the journal
without refetching. What is *not* done by cancellation is :func:`discard` (the user cancelled
the job): it runs after the worker has ended, under the install's lock, and removes the partial
stage, leaving DEST as it was.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..disk.launchlock import try_hold_for_switch
from ..disk.state import StateDir
from ..disk.switch import recover
from ..errors import P2PNodeError, UsageError, most_telling
from ..node.options import InstallOptions
from ..node.result import InstallResult
from ..ratelimit import RateLimiter
from ..release import keys
from .control import Service
from .job import JobKind, JobState, Progress
from .library import Entry
from .move import (
    MoveJournal,
    check_space,
    check_target,
    choose_method,
    finish,
    journal_path,
    journals,
    recover_files,
    transfer,
)

if TYPE_CHECKING:
    from ..discovery.race import Discovery
    from ..swarm.node import SwarmNode

__all__ = ["Meter", "WorkerContext", "discard", "move_install", "recover_moves", "run_job"]

#: Seconds between progress reports while a job runs (the page's bars move at this pace).
REPORT_INTERVAL = 0.5
#: Seconds over which the reported rate is averaged.
RATE_WINDOW = 3.0
#: Seconds between looks at the launcher lock while a game holds an update's switch.
LAUNCH_POLL = 1.0
#: Seconds between a job's asks to its tracker for more peers (the tracker's default
#: ``min_interval``): daemons fetching one build at once list themselves as they start, and
#: those that started first learn of the later ones only by asking again.
JOB_REQUERY = 10.0


class Meter:
    """The install's progress (the ``progress.Progress`` protocol) as counters the worker
    samples: safe to advance from the install's writer threads (an int add under the GIL)."""

    def __init__(self, node: SwarmNode | None = None) -> None:
        self.total: int | None = None
        self.done = 0
        self.result: InstallResult | None = None
        self.node = node  # (the daemon's: it counts the peers of the job's build)
        self._samples: list[tuple[float, int]] = []

    def start(self, total: int, description: str) -> None:
        self.total, self.done = total, 0

    def advance(self, n: int) -> None:
        self.done += n

    def finish(self) -> None:
        pass

    def sample(self, now: float) -> Progress:
        """What to report at ``now`` (monotonic seconds): bytes, the recent rate, and bytes
        by source (the CDN's share is what neither peers nor local copies account for: the
        fetcher totals its own figure only when it ends), and the peers exchanging the build's
        chunks with the daemon's node now."""
        done = self.done
        self._samples = [(t, d) for t, d in self._samples if now - t <= RATE_WINDOW]
        self._samples.append((now, done))
        t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        by_source: tuple[tuple[str, int], ...] = ()
        peers = 0
        r = self.result
        if r is not None:
            local = r.bytes_reused + r.bytes_resumed
            cdn = max(r.bytes_cdn, done - local - r.bytes_peers)
            by_source = (("cdn", cdn), ("local", local), ("peers", r.bytes_peers))
            if self.node is not None:
                peers = self.node.peers_in(r.manifest.id)
        return Progress(done, self.total, max(0.0, rate), by_source, peers)


@dataclass
class WorkerContext:
    """What every worker of one daemon shares."""

    service: Service
    identity_dir: Path  # the state dir: one node key for every job
    download: RateLimiter
    upload: RateLimiter
    #: Called (in the daemon's task) with each finished job's entry and result (None for a
    #: verify): the daemon refreshes what it serves and reports to the tracker.
    on_installed: Callable[[Entry, InstallResult | None, float], None] = field(
        default=lambda entry, result, seconds: None
    )
    #: Called with an entry, the error of a failed attempt, its seconds and, once the build
    #: was known, the attempt's figures (the tracker's outcome report names the build).
    on_failed: Callable[[Entry, P2PNodeError, float, InstallResult | None], None] = field(
        default=lambda entry, error, seconds, attempted: None
    )
    #: Called (in the daemon's task) as a job's stage is about to hold its build: the daemon
    #: offers it from its serving node at once, since the job announced that node for it.
    on_staging: Callable[[], None] = field(default=lambda: None)
    connections: int = 8
    #: The daemon's one swarm node: every job fetches through it, and serves what it stages
    #: from it (None: each job opens its own, as the standalone verbs do).
    node: SwarmNode | None = None
    #: Where that node listens (None: it does not): jobs announce it for the builds they
    #: stage, which it serves as they land.
    served_at: tuple[str, int] | None = None
    #: The daemon's one discovery (its DHT node and LAN; None: the daemon runs none): jobs
    #: look peers up through it, raced with their entry's tracker, never starting their own.
    discovery: Discovery | None = None


async def run_job(
    ctx: WorkerContext,
    job_id: str,
    attempt: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run attempt ``attempt`` of job ``job_id`` to its end, reporting to the service.
    Cancellation (a ``Stop``) ends it silently: the journal keeps what was fetched."""
    service = ctx.service
    job = next(j for j in service.queue.jobs if j.id == job_id)
    entry = service.library.get(job.entry)
    meter = Meter(ctx.node)
    task_status.started()
    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_progress, service, job_id, attempt, meter)
            result = await _run(ctx, job.kind, job.target, entry, meter, job_id, attempt)
            nursery.cancel_scope.cancel()
    except (P2PNodeError, OSError, BaseExceptionGroup) as exc:
        error = _our_error(exc)
        service.failed(job_id, attempt, str(error))
        ctx.on_failed(entry, error, time.monotonic() - started, meter.result)
        return
    service.report(job_id, attempt, progress=meter.sample(time.monotonic()))
    service.finished(job_id, attempt)
    ctx.on_installed(entry, result, time.monotonic() - started)


async def _report_progress(service: Service, job_id: str, attempt: int, meter: Meter) -> None:
    while True:
        await trio.sleep(REPORT_INTERVAL)
        service.report(job_id, attempt, progress=meter.sample(time.monotonic()))


async def _run(
    ctx: WorkerContext,
    kind: JobKind,
    target: str | None,
    entry: Entry,
    meter: Meter,
    job_id: str,
    attempt: int,
) -> InstallResult | None:
    dest = Path(entry.dest)
    options = _options(ctx, entry, meter, dest, kind)
    if kind is JobKind.VERIFY:
        from ..node.verify import verify

        ctx.service.report(job_id, attempt, phase=JobState.VERIFYING)
        await verify(dest, repair=True, options=options, progress=meter)
        return None
    if kind is JobKind.MOVE:
        await move_install(ctx, entry, target, meter, job_id, attempt)
        return None
    from ..node.install import install

    location, data, options.key_chain = await _manifest(ctx, entry, target)
    trusted = [keys.parse_public_key(k) for k in entry.trust]
    held: list[int] = []

    async def before_switch() -> None:
        ctx.service.report(job_id, attempt, phase=JobState.VERIFYING)
        held.append(await _hold_launch_lock(dest))

    options.before_switch = before_switch
    try:
        return await install(location, dest, trusted, options, meter, manifest_data=data)
    finally:
        for fd in held:
            os.close(fd)


def _options(
    ctx: WorkerContext, entry: Entry, meter: Meter, dest: Path, kind: JobKind
) -> InstallOptions:
    def watch(result: InstallResult) -> None:
        meter.result = result
        ctx.on_staging()

    return InstallOptions(
        connections=ctx.connections,
        # The cap in force as the job starts sizes the CDN's requests and socket buffers (what
        # a stop or a crash loses); the shared limiter enforces the cap, live.
        max_download_rate=None if ctx.download.rate is None else int(ctx.download.rate),
        limiter=ctx.download,
        upload_limiter=ctx.upload,
        identity_dir=ctx.identity_dir,
        tracker=entry.tracker,
        node=ctx.node,
        served_at=ctx.served_at,
        shared_discovery=ctx.discovery,
        discovery_requery=JOB_REQUERY,
        require_installed=kind is JobKind.UPDATE,
        watch_result=watch,
    )


async def _manifest(
    ctx: WorkerContext, entry: Entry, target: str | None
) -> tuple[str, bytes | None, str | None]:
    """Where the build comes from: the job's target manifest through the entry's tracker, the
    channel's head when the job names none, or (no tracker) the target's manifest URL, else the
    entry's; and the app's key chain, when the feed named it (``InstallOptions.key_chain``)."""
    if entry.tracker is None:  # an update may name the new build's manifest URL
        url = target if target and target.startswith(("http://", "https://")) else entry.source
        return url, None, None
    from ..discovery.tracker import TrackerClient
    from ..node.tracking import channel_manifest, node_and_build

    if target is None:  # named, so that a staged rollout counts the daemon in or out
        node, have = await trio.to_thread.run_sync(
            node_and_build, ctx.identity_dir, Path(entry.dest)
        )
        return await channel_manifest(
            entry.tracker, entry.source, entry.channel, node=node, have=have
        )
    async with TrackerClient(entry.tracker) as tracker:
        data = await tracker.fetch_manifest(bytes.fromhex(target))
    # (a followed update: the follower learnt the feed's chain already, node/rotations.py)
    return f"{entry.tracker} ({entry.source}/{entry.channel})", data, None


async def _hold_launch_lock(dest: Path) -> int:
    """Wait while a launcher holds the game's launch lock; return it held exclusively."""
    while True:
        fd = await trio.to_thread.run_sync(try_hold_for_switch, dest)
        if fd is not None:
            return fd
        await trio.sleep(LAUNCH_POLL)


async def move_install(
    ctx: WorkerContext, entry: Entry, target: str | None, meter: Meter, job_id: str, attempt: int
) -> None:
    """Move the install to ``target`` (service/move.py) under its install lock and, as a
    switch does, its launcher lock; then point the library there and delete the old tree. A
    stop during a copy undoes it; once the copy is verified the move goes through."""
    if target is None:
        raise UsageError("a move job without a new DEST", fix="cancel it and move again with --to")
    if entry.dest == target:
        return  # a restart finished it
    src, dst = Path(entry.dest), Path(target)
    await trio.to_thread.run_sync(check_target, entry.dest, target)
    service = ctx.service
    journal = MoveJournal(
        journal_path(service.state.moves, entry.id),
        entry.id,
        entry.dest,
        target,
        await trio.to_thread.run_sync(choose_method, src, dst),
    )
    moved = False
    try:
        with StateDir(src) as sd:  # no standalone verb works on it meanwhile
            # A switch a kill left half done is finished here: its record names DEST's inode,
            # which a copy does not keep.
            await trio.to_thread.run_sync(recover, sd, sd.load())
            held = await _hold_launch_lock(src)
            try:
                meter.start(await trio.to_thread.run_sync(check_space, journal), "move")
                stopped = threading.Event()

                def verifying() -> None:
                    trio.from_thread.run_sync(
                        lambda: service.report(job_id, attempt, phase=JobState.VERIFYING)
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_set_when_cancelled, stopped)
                    moved = await trio.to_thread.run_sync(
                        transfer, journal, meter.advance, stopped, verifying
                    )
                    if moved:  # in the thread's step: no stop comes between the copy and this
                        service.relocate(entry.id, target)
                        service.report(job_id, attempt, progress=meter.sample(time.monotonic()))
                        service.finished(job_id, attempt)
                    nursery.cancel_scope.cancel()
            finally:
                os.close(held)
    finally:
        if moved:  # even when stopped now: the library names the new place
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(finish, journal)


async def _set_when_cancelled(event: threading.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        event.set()


async def recover_moves(service: Service, emit: Callable[[dict[str, Any]], None]) -> None:
    """Settle the moves a killed daemon left half done (service/move.py, "The journal"):
    the game ends whole at one place, and the library names it. At the daemon's start."""
    for journal in await trio.to_thread.run_sync(journals, service.state.moves):
        try:
            forward = await trio.to_thread.run_sync(recover_files, journal)
            if forward and journal.entry in service.library:
                service.relocate(journal.entry, journal.dst)
            if forward:
                await trio.to_thread.run_sync(finish, journal)
        except (P2PNodeError, OSError) as exc:
            emit({"event": "warning", "entry": journal.entry, "error": f"move: {exc}"})
            continue
        at = journal.dst if forward else journal.src
        emit({"event": "move-recovered", "entry": journal.entry, "dest": at})


def discard(dest: Path) -> None:
    """What a cancelled job leaves behind, removed: the partial stage and its journal; and for
    an install that never switched, the whole state directory the install made beside DEST.
    DEST itself is not touched (an install creates it only by the switch). Blocking: run it in
    a thread, after the worker ended.
    """
    sd = StateDir(dest)
    if not sd.root.exists():
        return
    with sd:
        state = sd.load()
        if state.pending is not None:
            return  # a switch in flight: the next install finishes it, nothing is undone
        shutil.rmtree(sd.stage, ignore_errors=True)
        sd.journal.unlink(missing_ok=True)
        never_installed = state.current is None
    if never_installed:
        shutil.rmtree(sd.root, ignore_errors=True)


def _our_error(exc: BaseException) -> P2PNodeError:
    """The typed error behind a job's failure (a disk error named as one); anything else (a
    bug, cancellation) goes up."""
    cause = most_telling(exc) if isinstance(exc, BaseExceptionGroup) else exc
    if isinstance(cause, P2PNodeError):
        return cause
    if isinstance(cause, OSError):
        where = f" ({cause.filename})" if cause.filename else ""
        fix = "check the path and permissions"
        return P2PNodeError(f"{cause.strerror or cause}{where}", fix=fix)
    raise exc
