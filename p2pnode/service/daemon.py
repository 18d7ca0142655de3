"""``p2pnode daemon``: the client service's trio shell around :class:`Service`.

One process per state dir: it locks the state dir (a second daemon is refused with
``ServiceLockedError``), loads the library, queue and settings, and then does what the queue
asks, whenever anything changes::

    loop:   wanted = service.next_actions()
            Start(job, attempt) -> a worker task (worker.py) in its own cancel scope
            Stop(job, attempt)  -> cancel that scope (the stage journal keeps its chunks)
            Discard(job)        -> after the worker ended: remove the partial stage (worker.discard)
            caps in force       -> the global download and upload limiters (set_rate, live)
            sleep until: a change (API call, worker report, feed), the queue's deadline, the
                         schedule's next change, or 60 s (wall clocks jump)

Around the loop: one node identity kept in the state dir (``STATE/node-key.pem``), one swarm
node through which every job fetches and which (with ``--listen``) serves every installed build
and every build being staged from one port (``serving.py``), one follower per
auto-updating entry (``follow.py``), the local API when ``--api`` is given (``api.py``'s
``serve_api``, built separately), and the tracker reports ``watch`` sends after each install.

Jobs of one entry never overlap on its DEST: a new worker (or a discard) for an entry waits
for the previous one to end, so a Stop followed at once by a Start, or a cancel followed by a
new install, never meets the install lock.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..cdn.drain import DRAIN, Drain
from ..discovery.tracker import TrackerClient
from ..errors import P2PNodeError, UsageError
from ..node.result import InstallResult
from ..ratelimit import RateLimiter
from ..release import manifest as M
from .control import Service
from .follow import Followers
from .job import JobState
from .library import Entry
from .queue import Discard, Start, Stop
from .schedule import Caps
from .serving import RESEED_SECONDS, Listings, ServedIndex
from .statedir import StateDir
from .worker import WorkerContext, discard, recover_moves, run_job

if TYPE_CHECKING:
    from ..discovery.race import Discovery
    from ..identity import NodeIdentity
    from ..swarm.node import SwarmNode

__all__ = ["DaemonOptions", "Running", "run_daemon"]

#: The longest the loop sleeps without looking at the clock (DST, NTP steps, suspend).
MAX_SLEEP = 60.0
#: The longest a paused job's CDN requests in flight may take to land (their bytes were sent
#: and are paid for) before the job is cut off: a pause stops traffic within this.
DRAIN_SECONDS = 0.8

Emit = Callable[[dict[str, Any]], None]


#: The local API by default: loopback, a free port (``STATE/api.json`` says which).
DEFAULT_API = "127.0.0.1:0"


@dataclass
class DaemonOptions:
    state: Path
    table: dict[str, Any] = field(default_factory=dict)  # the config file's [service] table
    where: str = "config.toml"  # where the table came from, for its errors
    listen: str | None = None  # HOST:PORT of the swarm node serving everything installed
    api: str | None = DEFAULT_API  # HOST:PORT (or unix:PATH) of the local API; None: none
    report: bool = True  # report installs and outcomes to the entries' trackers
    # With ``listen``: one DHT node (UDP port; 0: any) and LAN announces for all it serves.
    dht_port: int | None = None
    dht_bootstrap: Sequence[str] = ()
    lan: bool = False
    clock: Callable[[], float] = time.time  # wall-clock seconds (tests pass their own)
    local_now: Callable[[], datetime] = datetime.now  # the schedule's local time (tests too)


@dataclass
class Running:
    """What a started daemon tells its caller (``nursery.start(run_daemon, ...)``)."""

    service: Service
    listen_port: int | None
    daemon: Daemon


async def run_daemon(
    opts: DaemonOptions,
    emit: Emit | None = None,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled; then stop the workers and save what is unsaved."""
    emit = emit or (lambda event: None)
    state = StateDir(opts.state)
    state.lock()
    try:
        service = Service.open(
            state, opts.table, opts.where, clock=opts.clock, local_now=opts.local_now
        )
        try:
            async with trio.open_nursery() as nursery:
                daemon = Daemon(service, opts, emit, nursery)
                port = await daemon.start()
                emit({"event": "started", "state": str(opts.state), "listen_port": port})
                task_status.started(Running(service, port, daemon))
                try:
                    await daemon.loop()
                finally:
                    with trio.CancelScope(shield=True):
                        await daemon.followers.aclose()
        finally:
            service.flush()
    finally:
        state.unlock()


@dataclass
class _Worker:
    attempt: int
    scope: trio.CancelScope
    done: trio.Event
    drain: Drain = field(default_factory=Drain)


class Daemon:
    """The loop's state: the workers by job, the limiters, the serving node."""

    def __init__(self, service: Service, opts: DaemonOptions, emit: Emit, nursery: trio.Nursery):
        self.service = service
        self.opts = opts
        self.emit = emit
        self.nursery = nursery
        self.caps = service.caps()
        self.download = RateLimiter(self.caps.download)
        self.upload = RateLimiter(self.caps.upload)
        self.workers: dict[str, _Worker] = {}
        # entry id -> the end of the last task (worker or discard) that works on its DEST
        self._busy: dict[str, trio.Event] = {}
        self._wake = trio.Event()
        self.node: SwarmNode | None = None
        self.listings: Listings | None = None
        self.index = ServedIndex()
        self._refreshing = trio.Lock()  # one rebuild of the served index at a time
        self.discovery: Discovery | None = None
        self._announced: set[bytes] = set()
        self.listen_port: int | None = None
        self.identity: NodeIdentity | None = None
        self.followers = Followers(service, nursery, emit)
        self.ctx = WorkerContext(
            service,
            service.state.root,
            self.download,
            self.upload,
            on_installed=self._installed,
            on_failed=self._failed,
            on_staging=lambda: self.nursery.start_soon(self._refresh),
        )
        service.on_change(lambda: self._wake.set())  # (the event is replaced each turn)

    async def start(self) -> int | None:
        """The identity, the node and the API; returns the swarm port (None: none)."""
        from ..disk.holdings import Holdings
        from ..identity import load_or_create
        from ..swarm.node import SwarmNode, parse_peer

        self.identity = await trio.to_thread.run_sync(load_or_create, self.service.state.root)
        await recover_moves(self.service, self.emit)  # before anything reads a DEST
        self.followers.node_id = self.identity.node_id  # staged rollouts: the feed's node=
        # The one node every job fetches through (it listens only with --listen).
        self.node = SwarmNode(
            self.identity,
            Holdings(),
            upload_limiter=self.upload,
            download_limiter=self.download,
        )
        self.ctx.node = self.node
        if self.opts.listen:
            host, port = parse_peer(self.opts.listen, listen=True)
            self.listen_port = await self.nursery.start(self.node.serve, host, port)
            self.ctx.served_at = (host, self.listen_port)
            if self.opts.report:
                self.listings = Listings(
                    self.identity,
                    self.service.state.root,
                    (host, self.listen_port),
                    self.node,
                    self.nursery,
                )
        if self.opts.dht_port is not None or self.opts.dht_bootstrap or self.opts.lan:
            self.discovery = await self.nursery.start(self._discovery, self.ctx.served_at)
            self.ctx.discovery = self.discovery
        if self.listen_port is not None:
            await self._refresh()
            self.nursery.start_soon(self._reseed)
        if self.opts.api:
            await start_api(self.service, self.opts.api, self.nursery, self.emit)
        return self.listen_port

    # The loop ----------------------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            self._wake = trio.Event()
            wanted = self.service.next_actions()
            for action in wanted.actions:
                if isinstance(action, Start):
                    self._start(action.job, action.attempt)
                elif isinstance(action, Stop):
                    self._stop(action.job, action.attempt)
                elif isinstance(action, Discard):
                    self._discard(action.job)
            self.followers.sync()
            self.apply_caps()
            timeout = MAX_SLEEP
            change = self.service.next_schedule_change()
            if change is not None:
                timeout = min(timeout, change + 0.05)
            if wanted.deadline is not None:
                timeout = min(timeout, max(0.0, wanted.deadline - self.opts.clock()) + 0.05)
            with trio.move_on_after(timeout):
                await self._wake.wait()

    def apply_caps(self) -> None:
        """The caps in force now onto the shared limiters (sleepers follow at once)."""
        caps: Caps = self.service.caps()
        if caps != self.caps:
            self.caps = caps
            self.download.set_rate(caps.download)
            self.upload.set_rate(caps.upload)
            self.emit({"event": "caps", "download": caps.download, "upload": caps.upload})

    def _after(self, entry: str, run: Callable[[], Awaitable[None]]) -> trio.Event:
        """Run ``run`` once the entry's previous task has ended; returns this one's end."""
        before = self._busy.get(entry)
        done = trio.Event()
        self._busy[entry] = done

        async def chained() -> None:
            try:
                if before is not None:
                    await before.wait()
                await run()
            finally:
                done.set()
                if self._busy.get(entry) is done:
                    del self._busy[entry]

        self.nursery.start_soon(chained)
        return done

    def _start(self, job_id: str, attempt: int) -> None:
        job = next(j for j in self.service.queue.jobs if j.id == job_id)
        scope = trio.CancelScope()

        drain = Drain()

        async def run() -> None:
            DRAIN.set(drain)  # this task's CDN fetches drain on a pause (see _stop)
            with scope:
                await run_job(self.ctx, job_id, attempt)

        worker = _Worker(attempt, scope, trio.Event(), drain)
        self.workers[job_id] = worker
        worker.done = self._after(job.entry, run)
        self.nursery.start_soon(self._forget_worker, job_id, worker)
        self.emit({"event": "job-started", "job": job_id, "attempt": attempt})

    async def _forget_worker(self, job_id: str, worker: _Worker) -> None:
        await worker.done.wait()
        self.nursery.start_soon(self._refresh)  # (serves what a stopped job staged from disk)
        if self.workers.get(job_id) is worker:
            del self.workers[job_id]
        self._wake.set()

    def _stop(self, job_id: str, attempt: int) -> None:
        worker = self.workers.get(job_id)
        if worker is None or worker.attempt != attempt:
            return
        job = next((j for j in self.service.queue.jobs if j.id == job_id), None)
        if job is None or job.state is JobState.CANCELLED:  # cancelled (and maybe forgotten):
            worker.scope.cancel()  # its stage goes, nothing in flight is worth a wait
        else:  # pause, preemption: let the CDN requests in flight land in the journal first
            worker.drain.request()
            self.nursery.start_soon(self._cancel_drained, worker)
        self.emit({"event": "job-stopped", "job": job_id, "attempt": attempt})

    @staticmethod
    async def _cancel_drained(worker: _Worker) -> None:
        with trio.move_on_after(DRAIN_SECONDS):
            await worker.drain.wait_idle()
        worker.scope.cancel()

    def _discard(self, job_id: str) -> None:
        # The DEST was taken at the cancel: the entry may be gone already (cancel, then
        # remove, in one turn of the loop), and its stage must still go.
        where = self.service.discard_dest(job_id)
        if where is None:
            return
        entry, dest = where[0], Path(where[1])

        async def run() -> None:
            try:
                await trio.to_thread.run_sync(discard, dest)
            except (P2PNodeError, OSError) as exc:  # e.g. a standalone verb holds the install
                self.emit({"event": "warning", "job": job_id, "error": f"discard: {exc}"})
                return
            self.emit({"event": "job-discarded", "job": job_id})

        self._after(entry, run)

    # After a job -------------------------------------------------------------------------

    def _installed(self, entry: Entry, result: InstallResult | None, seconds: float) -> None:
        self.nursery.start_soon(self._refresh)
        if result is not None:
            self.emit({"event": "installed", "entry": entry.id, "build": result.manifest.build})
            if entry.tracker and self.opts.report and result.action != "unchanged":
                self.nursery.start_soon(self._report, entry, result, seconds)

    def _failed(
        self, entry: Entry, error: P2PNodeError, seconds: float, attempted: InstallResult | None
    ) -> None:
        self.emit({"event": "job-failed", "entry": entry.id, "error": str(error)})
        if entry.tracker and self.opts.report and attempted is not None:
            self.nursery.start_soon(self._report_failure, entry, attempted, error, seconds)

    async def _refresh(self) -> None:
        if self.node is None or self.listen_port is None:
            return  # (not listening: nothing is served)
        entries = list(self.service.library.entries)
        dests = [Path(e.dest) for e in entries]
        trackers = {Path(e.dest): e.tracker for e in entries if e.tracker is not None}
        async with self._refreshing:
            current = await trio.to_thread.run_sync(self.index.refresh, self.node, dests, trackers)
        await self._announce()
        if self.listings is not None:
            wanted: dict[str, list[M.Manifest]] = {}
            for e in entries:
                if e.tracker is not None and Path(e.dest) in current:
                    wanted.setdefault(e.tracker, []).append(current[Path(e.dest)])
            self.listings.set(wanted)

    async def _discovery(
        self,
        listen: tuple[str, int] | None,
        *,
        task_status: trio.TaskStatus[Discovery] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One DHT node (and LAN) for the whole daemon, under the state dir's identity: every
        job looks peers up through it, and (serving at ``listen``) it announces everything the
        serving node holds, so peers find this daemon through it for every build."""
        from ..discovery.race import DiscoveryOptions, open_discovery

        assert self.identity is not None and self.node is not None
        options = DiscoveryOptions(
            dht_port=self.opts.dht_port,
            dht_bootstrap=self.opts.dht_bootstrap,
            lan=self.opts.lan,
            identity_dir=self.service.state.root,
            first_wait=0.0,
        )
        node = self.node
        async with open_discovery(self.identity, options, listen) as disc:
            disc.tally = lambda mid: (node.manifests[mid].total_size, 0, 0, 0, node.uploaded)
            task_status.started(disc)
            await trio.sleep_forever()

    async def _announce(self) -> None:
        """Announce what the serving node offers that was not announced yet (the DHT node
        re-announces what it was given by itself)."""
        if self.discovery is None or self.node is None:
            return
        fresh = [m for mid, m in self.node.manifests.items() if mid not in self._announced]
        self._announced.update(m.id for m in fresh)
        if fresh:
            await self.discovery.announce(fresh)

    async def _reseed(self) -> None:
        # (A running job's chunks need no re-read: it serves them through the node as they
        # land. This catches changes made outside the daemon.)
        while True:
            await trio.sleep(RESEED_SECONDS)
            await self._refresh()

    async def _report(self, entry: Entry, result: InstallResult, seconds: float) -> None:
        """As ``watch`` does: where the bytes came from, the peers' quality, the outcome."""
        from ..node.tracking import report_success, serving_host

        assert entry.tracker is not None and self.identity is not None
        host = await trio.to_thread.run_sync(serving_host, self.opts.listen, entry.tracker)
        async with TrackerClient(entry.tracker) as tracker:
            trouble = await report_success(
                tracker, self.identity, result, seconds, self.listen_port, host
            )
        if trouble is not None:
            self.emit({"event": "warning", "entry": entry.id, "error": trouble})

    async def _report_failure(
        self, entry: Entry, attempted: InstallResult, error: P2PNodeError, seconds: float
    ) -> None:
        """A failed attempt at a known build, with its failure code (as ``watch`` reports)."""
        from ..node.tracking import outcome_fields, report_outcome

        assert entry.tracker is not None and self.identity is not None
        m = attempted.manifest
        fields = outcome_fields(
            app=m.app,
            manifest_id=m.id,
            to_build=m.build,
            from_build=attempted.previous_build,
            seconds=seconds,
            error=error,
        )
        async with TrackerClient(entry.tracker) as tracker:
            trouble = await report_outcome(tracker, self.identity, fields)
        if trouble is not None:
            self.emit({"event": "warning", "entry": entry.id, "error": trouble})


async def start_api(service: Service, api: str, nursery: trio.Nursery, emit: Emit) -> None:
    """Serve the local API on ``api`` (HOST:PORT, or unix:PATH) with the state dir's token;
    ``STATE/api.json`` tells the client verbs where (port 0: a free port)."""
    from .api import serve_api  # Starlette and hypercorn load only when a daemon serves

    if api.startswith("unix:"):  # a Unix socket: unix:/path
        host, port = api, "0"
    else:
        host, _, port = api.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        fix = "e.g. --api 127.0.0.1:7656 or --api unix:/run/user/1000/p2pnode.sock"
        raise UsageError(f"--api {api!r} is not HOST:PORT", fix=fix) from None
    token = service.state.api_token()
    serve = partial(serve_api, service, host or "127.0.0.1", number, token)
    bound = await nursery.start(serve)
    emit({"event": "api", "listen": api, "bound": list(bound)})
