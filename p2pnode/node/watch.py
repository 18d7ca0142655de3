"""Following a channel: the long-running node a client keeps up to date with.

``p2pnode watch`` learns of each publish through the tracker's long poll (within a second),
installs the new build through the swarm (only the chunks it lacks), reports to the tracker, and
with ``--listen`` keeps serving what it holds between builds: when build N+1 is published, the
fleet's watchers hold most of its chunks already and serve them to each other while the origin
and the CDN supply only what changed.

A daemon must outlive bad news: a failed install (CDN down, a full disk, a manifest that does
not verify) is reported as an event, the installed build goes on being served, and the release
is tried again with backoff until it lands or a newer one supersedes it. Every attempt's
outcome, success or failure with its code, is reported to the tracker (``tracking``). A channel
moved back to an older build is not followed (a tracker must not be able to downgrade nodes:
rollback is the node owner's decision, ``p2pnode rollback``), nor is a build this node cannot
install (``release.compat``: too old a p2pnode, another platform), which is reported once and
not retried. Tracker outages are waited out. Each ``release`` event carries the build's update
type as the tracker's feed states it (``critical``: what a queue puts first).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..discovery.tracker import ChannelHead, TrackerClient, TrackerError
from ..disk.state import StateDir
from ..errors import (
    DowngradeError,
    IncompatibleError,
    P2PNodeError,
    UsageError,
    most_telling,
)
from ..progress import Progress
from .install import InstallOptions, InstallResult, install, install_and_seed
from .render import install_json

if TYPE_CHECKING:
    from ..identity import NodeIdentity

__all__ = ["WatchOptions", "watch"]

Event = dict[str, Any]


@dataclass
class WatchOptions:
    app: str
    channel: str
    tracker: str
    dest: Path
    trusted: Sequence[bytes]
    install: InstallOptions  # with ``listen``: serve between builds
    max_updates: int | None = None  # stop after this many installs (the head at start counts)
    retry_first: float = 10.0  # a failed install is tried again after this long, doubling ...
    retry_max: float = 300.0  # ... up to this
    tracker_retry_max: float = 30.0  # backoff cap while the tracker cannot be reached


async def watch(
    opts: WatchOptions, emit: Callable[[Event], None], progress: Progress | None = None
) -> int:
    """Follow the channel until ``max_updates`` installs (or cancellation); returns how many
    builds were installed or found already installed."""
    async with TrackerClient(opts.tracker) as tracker, trio.open_nursery() as nursery:
        follower = _Follower(opts, tracker, nursery, emit, progress)
        done = await follower.run()
        nursery.cancel_scope.cancel()  # stop serving: the caller asked for no more
        return done


class _Follower:
    def __init__(
        self,
        opts: WatchOptions,
        tracker: TrackerClient,
        nursery: trio.Nursery,
        emit: Callable[[Event], None],
        progress: Progress | None,
    ) -> None:
        self.opts = opts
        self.tracker = tracker
        self.nursery = nursery
        self.emit = emit
        self.progress = progress
        # Peers come from the tracker the node follows (and the DHT/LAN when configured).
        self.options = replace(opts.install, tracker=opts.install.tracker or opts.tracker)
        self.serving: tuple[trio.CancelScope, trio.Event] | None = None
        # Who reports to the tracker: our identity, and the address our records name.
        self.reporter: tuple[NodeIdentity, str | None] | None = None
        # The build this watcher last installed (an outcome's from-build), once it knows.
        self.build: int | None = None
        # Who asks the feed and what it runs: a staged rollout offers each node its build.
        self.node_id: bytes | None = None
        self.have: bytes | None = None

    async def run(self) -> int:
        seq, done = 0, 0
        if self.options.policy.asks_peers or self.options.listen:
            # A daemon pays for its imports at start, not when a build is out and a whole
            # fleet starts at once (the swarm's modules load lazily: ~40 ms of CPU); and a
            # mistyped address is said now, not at the first publish.
            from ..swarm.node import parse_peer

            for peer in self.options.peers:
                parse_peer(peer)
            if self.options.listen:
                parse_peer(self.options.listen, listen=True)
        await self._who_and_what()
        self.emit({"event": "watching", "app": self.opts.app, "channel": self.opts.channel})
        while self.opts.max_updates is None or done < self.opts.max_updates:
            head = await self._next_release(seq)
            seq = head.seq
            head, result = await self._land(head)
            seq = max(seq, head.seq)
            if result is not None:
                done += 1
        return done

    async def _land(self, head: ChannelHead) -> tuple[ChannelHead, InstallResult | None]:
        """Install ``head``, retrying with backoff; a newer release supersedes it."""
        delay = self.opts.retry_first
        while True:
            started = trio.current_time()
            outcome = await self._attempt(head)
            seconds = trio.current_time() - started
            if isinstance(outcome, UsageError):
                raise outcome  # the command line is wrong: no retry can help
            if isinstance(outcome, InstallResult):
                self.emit({"event": "installed", **install_json(outcome)})
                if outcome.action != "unchanged":
                    await self._report(outcome, seconds)
                self.build = outcome.manifest.build
                self.have = outcome.manifest.id
                return head, outcome
            if not isinstance(outcome, DowngradeError):  # a refusal by design, not a failure
                self.nursery.start_soon(self._report_failure, head, outcome, seconds)
            # Retrying cannot help a build that is older, or not for this node (too old a
            # p2pnode, another platform): wait for the next publish instead.
            final = isinstance(outcome, (DowngradeError, IncompatibleError))
            await self._serve_installed()  # first, so the event finds the node serving
            self.emit(
                {
                    "event": "error",
                    "build": head.build,
                    "error": outcome.message,
                    "fix": outcome.fix,
                    "retry_in_s": None if final else delay,
                }
            )
            if final:
                return head, None  # wait for a newer publish
            with trio.move_on_after(delay):
                head = await self._next_release(head.seq)
                delay = self.opts.retry_first  # a new build: try it at once
                continue
            delay = min(2 * delay, self.opts.retry_max)

    async def _next_release(self, since: int) -> ChannelHead:
        backoff, warned = 1.0, False
        while True:
            try:
                head = await self.tracker.wait_for_release(
                    self.opts.app,
                    self.opts.channel,
                    since=since,
                    node=self.node_id,
                    have=self.have,
                    on_head=self._key_chain,
                )
            except TrackerError as exc:
                if not warned:
                    self.emit({"event": "tracker-unreachable", "error": exc.message})
                    warned = True
                await trio.sleep(backoff)
                backoff = min(2 * backoff, self.opts.tracker_retry_max)
                continue
            release = {"app": head.app, "build": head.build, "version": head.version}
            # The tracker's word on the build's type (its signed manifest is not fetched yet):
            # what a queue orders by (critical first; ``head.critical``).
            kind = {"update_type": head.update_type, "critical": head.critical}
            self.emit({"event": "release", **release, **kind})
            return head

    async def _key_chain(self, head: ChannelHead) -> None:
        """Every feed answer names the app's key chain: learn a changed one (rotations.py),
        so an old key's builds are refused after their date without a new key's build."""
        if head.key_chain is None:
            return
        from .rotations import learn_chain

        try:
            new = await learn_chain(
                self.opts.dest, self.opts.app, head.key_chain, self.opts.tracker, self.opts.trusted
            )
        except (P2PNodeError, OSError) as exc:
            self.emit({"event": "warning", "error": f"could not learn a key rotation: {exc}"})
            return
        if new:
            self.emit({"event": "key-rotation", "app": self.opts.app, "learnt": new})

    async def _who_and_what(self) -> None:
        """This node's id (made on first use) and the build installed in ``dest``, if any: the
        feed's answer depends on them while a staged rollout is under way."""
        from .tracking import node_and_build

        self.node_id, self.have = await trio.to_thread.run_sync(
            node_and_build, self.options.identity_dir, self.opts.dest
        )

    async def _attempt(self, head: ChannelHead) -> InstallResult | P2PNodeError:
        try:
            data = await self.tracker.fetch_manifest(head.manifest_id)
        except P2PNodeError as exc:
            return exc
        location = f"{self.opts.tracker} ({self.opts.app}/{self.opts.channel})"
        self.options.key_chain = head.key_chain  # (learnt on the poll too: _key_chain)
        return await self._install(location, data)

    async def _install(self, location: str, data: bytes) -> InstallResult | P2PNodeError:
        await self._stop_serving()  # frees the install lock and the listening port
        args = (location, self.opts.dest, self.opts.trusted, self.options, self.progress)
        if not self.options.listen:
            try:
                return await install(*args, manifest_data=data)
            except (P2PNodeError, BaseExceptionGroup) as exc:
                return _our_error(exc)
        run = partial(install_and_seed, *args, manifest_data=data)
        outcome: InstallResult | P2PNodeError = await self.nursery.start(
            self._install_and_serve, run
        )
        return outcome

    async def _install_and_serve(
        self,
        seeding: Callable[..., Awaitable[object]],
        *,
        task_status: trio.TaskStatus[InstallResult | P2PNodeError] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``seeding`` (``install_and_seed`` bound to its build); tell the caller
        (``task_status``) how the install went, then let it serve until cancelled."""
        ready = False
        finished = trio.Event()
        with trio.CancelScope() as scope:
            self.serving = (scope, finished)
            try:
                async with trio.open_nursery() as nursery:
                    result: InstallResult = await nursery.start(seeding)
                    ready = True
                    if result.listen_port:  # --listen HOST:0 keeps the port it got, for good
                        host = self.options.listen.rpartition(":")[0] if self.options.listen else ""
                        self.options.listen = f"{host}:{result.listen_port}"
                    task_status.started(result)
            except (P2PNodeError, BaseExceptionGroup) as exc:
                error = _our_error(exc)
                if not ready:
                    task_status.started(error)
                else:  # serving broke (the listener died): say so, keep following
                    self.emit({"event": "error", "error": error.message, "fix": error.fix})
            finally:
                finished.set()
                if self.serving is not None and self.serving[1] is finished:
                    self.serving = None

    async def _stop_serving(self) -> None:
        if self.serving is not None:
            scope, finished = self.serving
            scope.cancel()
            await finished.wait()
            self.serving = None

    async def _serve_installed(self) -> None:
        """After a failed install: go on serving the build that is installed, if any."""
        if not self.options.listen or self.serving is not None:
            return
        sd = StateDir(self.opts.dest)
        try:
            state = sd.load() if sd.exists else None
            if state is None or not state.current:
                return
            data = sd.load_signed(state.current).encode()
        except (P2PNodeError, OSError):
            return
        outcome = await self._install(f"installed build in {self.opts.dest}", data)
        if isinstance(outcome, P2PNodeError):
            self.emit({"event": "error", "error": outcome.message, "fix": outcome.fix})

    async def _me(self) -> tuple[NodeIdentity, str | None]:
        from .tracking import reporter

        if self.reporter is None:
            self.reporter = await reporter(
                self.options.identity_dir, self.options.listen, self.opts.tracker
            )
        return self.reporter

    async def _report(self, result: InstallResult, seconds: float) -> None:
        """Tell the tracker where the bytes came from, how the peers did, and the outcome."""
        from .tracking import report_success

        me, host = await self._me()
        trouble = await report_success(self.tracker, me, result, seconds, result.listen_port, host)
        if trouble is not None:
            self.emit({"event": "warning", "error": trouble})

    async def _report_failure(self, head: ChannelHead, error: P2PNodeError, seconds: float) -> None:
        """Tell the tracker an attempt at ``head`` failed, and why (in the background: the
        tracker may be what failed)."""
        from .tracking import outcome_fields, report_outcome

        me, _ = await self._me()
        fields = outcome_fields(
            app=head.app,
            manifest_id=head.manifest_id,
            to_build=head.build,
            from_build=self.build,
            seconds=seconds,
            error=error,
        )
        trouble = await report_outcome(self.tracker, me, fields)
        if trouble is not None:
            self.emit({"event": "warning", "error": trouble})


def _our_error(exc: BaseException) -> P2PNodeError:
    """The typed error behind an install's failure (concurrent tasks fail as a group); anything
    else (a bug, cancellation) goes on up."""
    cause = most_telling(exc) if isinstance(exc, BaseExceptionGroup) else exc
    if isinstance(cause, P2PNodeError):
        return cause
    raise exc
