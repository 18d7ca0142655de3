"""Following library entries' channels: a new build on the tracker's feed becomes an automatic
``UPDATE`` job.

One task per entry that has a tracker and auto-update on, each on the tracker's long poll as
``watch`` is (``discovery/tracker.py``): a publish reaches the queue within a second. The task
only *queues*; the queue decides when the update runs (update windows, deferral, priority), and
a newer build announced while the update waits or runs is folded into it. A channel moved back
to an older build is not followed (rollback is the owner's decision), and tracker outages are
waited out with backoff.

Critical updates: :func:`is_critical` reads the signed manifest's release metadata (the
publisher's update type, ``publish --type critical``); the queue then starts the update first,
taking a slot from a running normal job if it must, inside or outside update windows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from ..discovery.tracker import ChannelHead, TrackerClient, TrackerError
from ..disk.state import StateDir
from ..errors import JobStateError, P2PNodeError
from ..node.rotations import learn_chain
from ..release import keys
from ..release import manifest as M
from .control import Service
from .job import JobKind
from .library import Entry

__all__ = ["Followers", "follow", "installed_build", "is_critical"]

#: Backoff cap while the tracker cannot be reached, and the wait before asking the queue again
#: when the entry has a job of another kind (a verify) in the way.
RETRY_MAX = 30.0
#: How long each long poll asks the tracker to hold it: near the tracker's 60 s cap, since an
#: idle daemon following fifty channels pays for every poll (a publish still answers at once).
POLL_WAIT = 55.0


def is_critical(manifest: M.Manifest) -> bool:
    """Whether the publisher marked this build critical (it jumps the queue and ignores update
    windows and deferral). Read from the signed manifest's release metadata, not from the
    tracker's head: a tracker must not be able to push a build past the user's windows (the
    install verifies these same bytes, so a forged manifest is refused there)."""
    return manifest.info.critical


def installed_build(dest: Path) -> tuple[int, bytes] | None:
    """The build installed at ``dest`` and its manifest id (None: nothing, or unreadable).
    Blocking."""
    sd = StateDir(dest)
    try:
        if not sd.exists:
            return None
        state = sd.load()
        if not state.current:
            return None
        manifest = sd.load_manifest(state.current)
        return manifest.build, manifest.id
    except (P2PNodeError, OSError):
        return None


async def follow(
    service: Service,
    entry: Entry,
    emit: Callable[[dict[str, Any]], None] | None = None,
    http: httpx.AsyncClient | None = None,
    node: bytes | None = None,
) -> None:
    """Queue an update for every newer build on ``entry``'s channel, until cancelled.
    ``http``: a client shared by many followers (one connection pool, not one per game).
    ``node``: this node's id, named to the feed with the installed build so that a staged
    rollout offers this node its own build (without it the node is outside every rollout)."""
    assert entry.tracker is not None
    emit = emit or (lambda event: None)
    async with TrackerClient(entry.tracker, client=http) as tracker:
        seq = 0
        while True:
            have = await trio.to_thread.run_sync(installed_build, Path(entry.dest))
            head = await _next(tracker, entry, seq, emit, node, have[1] if have else None)
            seq = head.seq
            await _offer(service, tracker, entry, head, emit)


async def _next(
    tracker: TrackerClient,
    entry: Entry,
    since: int,
    emit: Callable[[dict[str, Any]], None],
    node: bytes | None,
    have: bytes | None,
) -> ChannelHead:
    backoff, warned = 1.0, False
    while True:
        try:
            return await tracker.wait_for_release(
                entry.source,
                entry.channel,
                since=since,
                wait=POLL_WAIT,
                node=node,
                have=have,
                on_head=partial(_key_chain, entry, emit),
            )
        except TrackerError as exc:
            if not warned:
                emit({"event": "tracker-unreachable", "entry": entry.id, "error": exc.message})
                warned = True
            await trio.sleep(backoff)
            backoff = min(2 * backoff, RETRY_MAX)


async def _key_chain(
    entry: Entry, emit: Callable[[dict[str, Any]], None], head: ChannelHead
) -> None:
    """The feed names the app's key chain: learn a changed one for the entry's install
    (node/rotations.py), so its old key's builds are refused after their date."""
    if head.key_chain is None or entry.tracker is None:
        return
    try:
        trusted = [keys.parse_public_key(k) for k in entry.trust]
        new = await learn_chain(
            Path(entry.dest), entry.source, head.key_chain, entry.tracker, trusted
        )
    except (P2PNodeError, OSError) as exc:
        emit({"event": "warning", "entry": entry.id, "error": f"key rotation: {exc}"})
        return
    if new:
        emit({"event": "key-rotation", "entry": entry.id, "learnt": new})


async def _offer(
    service: Service,
    tracker: TrackerClient,
    entry: Entry,
    head: ChannelHead,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Queue ``head`` as an automatic update if it is newer than what is installed."""
    while True:
        have = await trio.to_thread.run_sync(installed_build, Path(entry.dest))
        if have is None or head.build <= have[0]:
            return  # not installed yet (the install job takes the head), or not newer
        try:
            data = await tracker.fetch_manifest(head.manifest_id)
        except P2PNodeError as exc:
            emit({"event": "error", "entry": entry.id, "error": str(exc)})
            return  # the next publish (or a restart) tries again
        critical = is_critical(M.parse_signed(data).manifest)
        try:
            job = service.submit(
                entry.id,
                JobKind.UPDATE,
                target=head.manifest_id.hex(),
                critical=critical,
                auto=True,
            )
        except JobStateError:  # a verify is in the way: ask again when it may be done
            await trio.sleep(RETRY_MAX)
            continue
        emit({"event": "update-queued", "entry": entry.id, "job": job.id, "build": head.build})
        return


class Followers:
    """One :func:`follow` task per entry that has a tracker and auto-update on, started and
    stopped as the library changes (:meth:`sync`, called on every service change)."""

    def __init__(
        self,
        service: Service,
        nursery: trio.Nursery,
        emit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.service = service
        self.nursery = nursery
        self.emit = emit
        #: this node's id for the feed's staged rollouts (set once the identity is loaded)
        self.node_id: bytes | None = None
        self.running: dict[str, tuple[Entry, trio.CancelScope]] = {}
        # One HTTP client for every long poll: an httpx client costs about a megabyte (its
        # TLS context), and a library of fifty games would hold fifty.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=90.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        for _, scope in self.running.values():
            scope.cancel()
        self.running.clear()
        await self.http.aclose()

    def sync(self) -> None:
        wanted = {
            e.id: e for e in self.service.library.entries if e.tracker is not None and e.auto_update
        }
        for eid, (entry, scope) in list(self.running.items()):
            if wanted.get(eid) != entry:
                scope.cancel()
                del self.running[eid]
        for eid, entry in wanted.items():
            if eid not in self.running:
                scope = trio.CancelScope()
                self.running[eid] = (entry, scope)
                self.nursery.start_soon(self._run, entry, scope)

    async def _run(self, entry: Entry, scope: trio.CancelScope) -> None:
        with scope:
            await follow(self.service, entry, self.emit, self.http, self.node_id)
