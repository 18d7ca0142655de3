"""What the daemon's one swarm node serves: every installed build of every library entry, the
chunks earlier builds share, and the builds its jobs are staging, from one port under one
identity.

``p2pnode seed`` serves one install; the daemon holds many, so its node's chunk index is the
union of every install's (:class:`~p2pnode.disk.holdings.Holdings`), and it offers the current
and kept builds of every entry. Like ``seed`` it holds no install lock (reads are verified, so
an update switching a tree meanwhile costs rejected reads, never a wrong byte) and re-reads the
installs after every job and every :data:`RESEED_SECONDS`. A running job needs no re-read: it
fetches through this node, attaches its stage to the index and tells peers of each chunk as it
lands (``node/peers.py``); the re-read keeps serving what a paused job staged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..disk.holdings import Holdings
from ..disk.stage import Journal, LocalChunks
from ..disk.state import StateDir
from ..disk.switch import local_chunks
from ..errors import P2PNodeError
from ..node.rotations import InstallKeys
from ..release import manifest as M

if TYPE_CHECKING:
    from ..discovery.race import Discovery
    from ..identity import NodeIdentity
    from ..swarm.node import SwarmNode

__all__ = [
    "RESEED_SECONDS",
    "Holdings",
    "Install",
    "Listings",
    "ServedIndex",
    "read_install",
]

#: How often the served index is rebuilt from the install directories (only changed installs
#: are re-read), for changes made outside the daemon.
RESEED_SECONDS = 30.0
#: Seconds between announces keeping an installed build listed on its tracker.
LISTING_INTERVAL = 60.0


@dataclass(frozen=True)
class Install:
    """What one install contributes to the served index, read at ``stamp``."""

    stamp: tuple[int, int]  # mtime_ns of state.json and of the stage journal (0: none)
    local: LocalChunks
    offers: list[tuple[M.Manifest, bytes | None]]  # current (signed) first, then kept builds
    current: M.Manifest | None
    staged: M.Manifest | None = None  # the build a job is assembling, if any


def _stamp(sd: StateDir) -> tuple[int, int]:
    def mtime(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    return mtime(sd.state_file), mtime(sd.journal)


def read_install(dest: Path) -> Install | None:
    """The chunks and builds of the install at ``dest``: the installed build, the kept ones,
    and the build being staged with the chunks its journal holds (a fleet installing one
    build trades them while they land). None if there is nothing to serve, or its state
    cannot be read (its job will say why). Blocking."""
    sd = StateDir(dest)
    try:
        stamp = _stamp(sd)
        state = sd.load()  # (empty while a first install stages)
        staged = Journal.target_of(sd.journal)
        if not state.current and staged is None:
            return None
        offers: list[tuple[M.Manifest, bytes | None]] = []
        current = None
        if state.current:
            signed = sd.load_signed(state.current)
            current = signed.manifest
            offers.append((current, signed.encode()))
        offers += [(sd.load_manifest(mid), None) for mid in state.history]
        kept = staged is not None and sd.manifest_file(staged.hex()).exists()
        target = None
        if staged is not None and kept and staged.hex() != state.current:
            signed_target = sd.load_signed(staged.hex())
            target = signed_target.manifest
            offers.append((target, signed_target.encode()))
        return Install(stamp, local_chunks(sd, state), offers, current, target)
    except (P2PNodeError, OSError):
        return None


class ServedIndex:
    """The serving node's index over many installs, rebuilt cheaply: an install whose state
    file and journal have not changed since the last look is not read again (an idle daemon
    holding fifty games should not parse fifty manifests every half minute)."""

    def __init__(self) -> None:
        self._installs: dict[Path, Install] = {}

    def refresh(
        self, node: SwarmNode, dests: Iterable[Path], trackers: dict[Path, str] | None = None
    ) -> dict[Path, M.Manifest]:
        """Rebuild ``node``'s index from ``dests``; returns the build installed at each (for
        the trackers' listings). ``trackers``: each install's tracker, where the key rotations
        of its app are asked for when a peer pushes a build of a key the node does not know.
        Blocking: call from a thread (the node is only assigned new objects, which the trio
        thread reads whole)."""
        installs: dict[Path, Install] = {}
        for dest in dests:
            known = self._installs.get(dest)
            if known is not None and known.stamp == _stamp(StateDir(dest)):
                installs[dest] = known
                continue
            fresh = read_install(dest)
            if fresh is not None:
                installs[dest] = fresh
        self._installs = installs
        for dest, install in installs.items():
            for manifest, signed in install.offers:
                if manifest.id not in node.manifests or (signed and manifest.id not in node.signed):
                    node.offer(manifest, signed)
            if install.current is not None and install.current.app not in node.swarms.keys:
                # pushes of its app are checked against its keys and learnt rotations
                app = install.current.app
                tracker = (trackers or {}).get(dest)
                node.swarms.keys[app] = InstallKeys(StateDir(dest), app, tracker=tracker)
        parts = [i.local for i in installs.values()]
        if isinstance(node.local, Holdings):  # (jobs' live stages stay attached)
            node.local.parts = parts
        else:
            node.local = Holdings(parts)
        return {d: i.current for d, i in installs.items() if i.current is not None}


class Listings:
    """Every installed build kept listed on its entry's tracker while the daemon serves it
    (as ``seed`` keeps its one build listed): one discovery per tracker, one ``keep_listed``
    task per build, re-announced every ``requery`` so the node never expires from the
    tracker's peer lists. Builds no longer installed are dropped at the next :meth:`set`."""

    def __init__(
        self,
        identity: NodeIdentity,
        identity_dir: Path,
        listen: tuple[str, int],
        node: SwarmNode,
        nursery: trio.Nursery,
    ) -> None:
        self.identity = identity
        self.identity_dir = identity_dir
        self.listen = listen
        self.node = node
        self.nursery = nursery
        self._wanted: dict[str, dict[bytes, M.Manifest]] = {}
        self._changed: dict[str, trio.Event] = {}

    def set(self, wanted: dict[str, list[M.Manifest]]) -> None:
        """The builds to keep listed, by tracker URL."""
        for url in set(wanted) | set(self._wanted):
            self._wanted[url] = {m.id: m for m in wanted.get(url, [])}
            if url not in self._changed:
                self._changed[url] = trio.Event()
                self.nursery.start_soon(self._tracker, url)
            self._changed[url].set()

    async def _tracker(self, url: str) -> None:
        from ..discovery.race import DiscoveryOptions, open_discovery

        # Re-announced at the tracker's own announce interval (its default 60 s; a peer is
        # dropped after three missed), not discovery's 30 s: fifty games, half the requests.
        options = DiscoveryOptions(
            tracker=url, identity_dir=self.identity_dir, first_wait=0.0, requery=LISTING_INTERVAL
        )
        node = self.node
        async with (
            open_discovery(self.identity, options, self.listen) as disc,
            trio.open_nursery() as nursery,
        ):
            disc.tally = lambda mid: (node.manifests[mid].total_size, 0, 0, 0, node.uploaded)
            listed: dict[bytes, trio.CancelScope] = {}
            while True:
                changed = self._changed[url] = trio.Event()
                wanted = self._wanted.get(url, {})
                for mid in [m for m in listed if m not in wanted]:
                    listed.pop(mid).cancel()
                for mid, manifest in wanted.items():
                    if mid not in listed:
                        listed[mid] = await nursery.start(_listed, disc, manifest)
                await changed.wait()


async def _listed(
    disc: Discovery,
    manifest: M.Manifest,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await disc.keep_listed(manifest)
