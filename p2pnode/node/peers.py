"""The peer-to-peer side of one install: our swarm node, the peers it asks, and discovery
feeding it more while it fetches.

The node serves (on ``--listen``) this build's swarm and those of every kept build of the app
from the moment it is open, so a fleet installing the same build at once trades chunks as they
land rather than after each member finishes.

The standalone verbs open a node per install. The client daemon holds one node for everything
(``InstallOptions.node``): its jobs fetch through it, with its identity and connections, and
attach their stage to its index (:class:`~p2pnode.disk.holdings.Holdings`) while they run, so
what lands is served from the daemon's one port at once, as ``watch --listen`` serves it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from ..discovery.race import Discovery, open_discovery
from ..disk.holdings import Holdings
from ..disk.stage import LocalChunks
from ..disk.state import InstallState, StateDir
from ..disk.switch import local_chunks
from ..errors import most_telling
from ..ratelimit import RateLimiter
from ..release import manifest as M
from .options import InstallOptions
from .policy import SourcePolicy
from .result import InstallResult

if TYPE_CHECKING:
    from ..swarm.node import SwarmNode
    from ..swarm.offers import AppKeys

__all__ = ["Swarm", "open_swarm"]


@dataclass
class Swarm:
    """The peer-to-peer side of one install: our node, and the peers to ask."""

    node: SwarmNode  # (imported lazily: CDN-only installs never load the swarm)
    peers: list[tuple[str, int]]
    #: What this install serves from: landed chunks are added here (the node's index, or the
    #: part of a shared node's index that is this install's).
    local: LocalChunks = field(default_factory=LocalChunks)
    more_peers: trio.MemoryReceiveChannel[tuple[str, int]] | None = None  # found later
    discovery: Discovery | None = None
    result: InstallResult | None = None  # the install's running figures (tracker announces)

    def tally(self, mid: bytes) -> tuple[int, int, int, int, int]:
        """(size, left, from_peers, from_cdn, uploaded) for tracker announces."""
        r = self.result
        if r is None or r.manifest.id != mid:
            return (0, 0, 0, 0, self.node.uploaded)
        return (r.bytes_total, r.bytes_left(), r.from_peers, r.from_cdn, self.node.uploaded)


@asynccontextmanager
async def open_swarm(
    sd: StateDir,
    state: InstallState,
    manifest: M.Manifest,
    options: InstallOptions,
    *,
    signed: M.SignedManifest | None = None,
    keys: AppKeys | None = None,
) -> AsyncIterator[Swarm | None]:
    """Our swarm node for this install (None without peers, --listen, a shared node or
    discovery): it serves, on ``options.listen`` (or where the shared ``options.node``
    listens), this build's swarm and those of every kept build of the app, and discovery keeps
    feeding it peers while it fetches. ``keys``: the app's keys, which manifests peers push
    are checked against (node/rotations.py's ``InstallKeys``)."""
    discovery = options.discovery()
    if options.peers or options.policy is SourcePolicy.CDN_ONLY:
        # Peers in hand answer first: start with them, discovery's join later. Or nothing is
        # asked of peers at all: discovery only announces what we serve.
        discovery = replace(discovery, first_wait=0.0)
    shared = options.node
    serves = options.listen or (shared is not None and options.served_at is not None)
    if not options.peers and not serves and not discovery.enabled:
        yield None
        return
    from ..swarm.node import parse_peer

    peers = [parse_peer(p) for p in options.peers]
    # With the signed manifest, peers that hold only earlier builds can be shown this one.
    offers = [(manifest, signed.encode() if signed is not None else None)]
    offers += [(sd.load_manifest(mid), None) for mid in [state.current, *state.history] if mid]
    if shared is None:
        node = await _own_node(sd, state, options)
        local = node.local
    else:
        node, local = shared, local_chunks(sd, state)
    if keys is not None:
        node.swarms.keys[manifest.app] = keys
    with _attached(node, local):  # (before the offers: a join is answered with the stage)
        for offered, data in offers:
            if offered.id not in node.manifests or (data and offered.id not in node.signed):
                node.offer(offered, data)
        # The install's own error, not a group of one: what is raised inside ``yield`` comes
        # out of this nursery.
        try:
            async with trio.open_nursery() as nursery:
                listen: tuple[str, int] | None = None
                if shared is None and options.listen:
                    host, port = parse_peer(options.listen, listen=True)
                    listen = (host, await nursery.start(node.serve, host, port))
                swarm = Swarm(node, peers, local=local)
                if not discovery.enabled:
                    yield swarm
                    nursery.cancel_scope.cancel()
                    return
                # The daemon's node serves what we stage where it listens: announce that,
                # with our figures (left > 0), so the fleet fetching this build finds it.
                announced = listen or options.served_at
                async with open_discovery(node.identity, discovery, announced) as disc:
                    disc.tally = swarm.tally
                    swarm.discovery = disc
                    nursery.start_soon(disc.announce, [m for m, _ in offers])
                    send, swarm.more_peers = trio.open_memory_channel[tuple[str, int]](256)
                    found = await nursery.start(disc.search, manifest, send)
                    swarm.peers += [p for p in found if p not in swarm.peers]
                    yield swarm
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise most_telling(group) from None


async def _own_node(sd: StateDir, state: InstallState, options: InstallOptions) -> SwarmNode:
    """A node of this install's own (the standalone verbs), under the machine's identity."""
    from ..identity import load_or_create
    from ..swarm.node import SwarmNode

    identity = await trio.to_thread.run_sync(load_or_create, options.identity_dir)
    return SwarmNode(
        identity,
        local_chunks(sd, state),
        upload_limiter=options.upload_limiter or RateLimiter(options.max_upload_rate),
        download_limiter=options.limiter,
        peer_upload_rate=options.max_peer_upload_rate,
        peer_download_rate=options.max_peer_download_rate,
        upload_slots=options.upload_slots,
        frugal=options.origin,
    )


@contextmanager
def _attached(node: SwarmNode, local: LocalChunks) -> Iterator[None]:
    """A shared node serves ``local`` (this install's chunks and stage) while the install
    runs; afterwards its owner's re-read of the install serves what stays on disk."""
    holdings = node.local
    if local is holdings or not isinstance(holdings, Holdings):
        yield
        return
    holdings.attach(local)
    try:
        yield
    finally:
        holdings.detach(local)
