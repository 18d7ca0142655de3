"""``p2pnode seed``: serve what is installed in a directory to peers, until stopped.

A seed box (or a client between updates) holds no lock: updates of the directory may run
meanwhile. Every chunk served is verified on read, and the index is rebuilt every
``RESEED_SECONDS``, so a concurrent update costs at most some rejected requests, never a wrong
byte. What is served is announced through discovery, and the installed build is kept listed on
the tracker (only that one: the tracker hands out peers for what they have installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..discovery.race import Discovery, DiscoveryOptions, open_discovery
from ..disk.stage import LocalChunks
from ..disk.state import StateDir
from ..disk.switch import local_chunks
from ..errors import NotInstalledError
from ..ratelimit import RateLimiter
from .rotations import InstallKeys

if TYPE_CHECKING:
    from ..swarm.node import SwarmNode

__all__ = ["RESEED_SECONDS", "seed"]

#: How often the served index is rebuilt from the install directory (a concurrent update
#: shows up within this long).
RESEED_SECONDS = 30.0


async def seed(
    dest: Path,
    listen: str,
    identity_dir: Path | None = None,
    max_upload_rate: int | None = None,
    *,
    frugal: bool = True,
    spare: bool = True,
    max_peer_upload_rate: int | None = None,
    upload_slots: int = 8,
    dht_port: int | None = None,
    dht_bootstrap: Sequence[str] = (),
    discovery: DiscoveryOptions | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the release installed in ``dest`` (and its kept earlier builds) until cancelled;
    ``task_status`` gets the bound port.

    ``discovery`` (or the ``dht_port``/``dht_bootstrap`` shorthand): where to announce what is
    served; the current build is also kept listed on the tracker.
    """
    from ..identity import load_or_create
    from ..swarm.node import SwarmNode, parse_peer

    sd = StateDir(dest)
    if not sd.exists:
        raise NotInstalledError(f"nothing is installed in {dest}")
    identity = await trio.to_thread.run_sync(load_or_create, identity_dir)
    node = SwarmNode(
        identity,
        LocalChunks(),
        upload_limiter=RateLimiter(max_upload_rate),
        peer_upload_rate=max_peer_upload_rate,
        upload_slots=upload_slots,
        frugal=frugal,
        spare=spare,
    )

    if discovery is None:
        discovery = DiscoveryOptions(dht_port=dht_port, dht_bootstrap=dht_bootstrap)
    tracker = discovery.tracker

    def refresh() -> str | None:
        """Rebuild the index; returns the installed build's manifest id (hex)."""
        state = sd.load()
        node.local = local_chunks(sd, state)
        for mid in [state.current, *state.history]:
            if mid:
                node.offer(sd.load_manifest(mid))
        if state.app and state.app not in node.swarms.keys:  # pushes: the app's known keys
            node.swarms.keys[state.app] = InstallKeys(sd, state.app, tracker=tracker)
        return state.current

    current = await trio.to_thread.run_sync(refresh)
    host, port = parse_peer(listen, listen=True)
    discovery.identity_dir = discovery.identity_dir or identity_dir
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(node.serve, host, port)
        async with AsyncExitStack() as stack:
            disc = None
            if discovery.enabled:
                disc = await stack.enter_async_context(
                    open_discovery(identity, discovery, (host, bound))
                )
                disc.tally = lambda mid: (node.manifests[mid].total_size, 0, 0, 0, node.uploaded)
            announced: set[bytes] = set()
            listed: tuple[str, trio.CancelScope] | None = None
            while True:
                if disc is not None:
                    fresh = [m for mid, m in node.manifests.items() if mid not in announced]
                    await disc.announce(fresh)
                    announced.update(m.id for m in fresh)
                    if current is not None and (listed is None or listed[0] != current):
                        if listed is not None:
                            listed[1].cancel()  # the tracker lists only what we have installed
                        listed = (current, await nursery.start(_listed, disc, node, current))
                task_status.started(bound)
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(RESEED_SECONDS)
                current = await trio.to_thread.run_sync(refresh)


async def _listed(
    disc: Discovery,
    node: SwarmNode,
    current: str,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep build ``current`` listed on the tracker until the returned scope is cancelled."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await disc.keep_listed(node.manifests[bytes.fromhex(current)])
