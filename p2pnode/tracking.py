"""A node's conversation with a tracker around one install: announce, peers, reports.

Before an install, a node that serves (``--listen`` with a concrete port) announces itself as
started and takes the peers the tracker ranks for it; after, it announces completion with the
bytes it got from peers and from the CDN (the tracker's offload figures) and reports the quality
of every peer it used (signed, as docs/tracker-api.md specifies). A node that does not serve
does not announce (the tracker would hand its address to others) but still reports.
"""

from __future__ import annotations

from typing import Any

from . import manifest as M
from .identity import NodeIdentity
from .tracker_client import PeerQualityReport, TrackerClient

__all__ = ["announce_completed", "peers_for"]


async def peers_for(
    tracker: TrackerClient, me: NodeIdentity, manifest: M.Manifest, port: int | None
) -> list[str]:
    """Announce ``started`` and return the peers (HOST:PORT) the tracker offers."""
    if not port:
        return []
    answer = await tracker.announce(
        me.key,
        app=manifest.app,
        manifest_id=manifest.id,
        port=port,
        event="started",
        size=manifest.total_size,
        left=manifest.total_size,
    )
    return [f"{p.ip}:{p.port}" for p in answer.peers if p.port and p.node_id != me.node_id]


async def announce_completed(
    tracker: TrackerClient, me: NodeIdentity, result: Any, port: int | None
) -> None:
    """Tell the tracker where this install's bytes came from, and how each peer did."""
    m = result.manifest
    if port and result.previous_id is not None:
        # Its earlier build is kept for rollback but no longer installed: leave that swarm's
        # seeders (the app-wide partial-seed answers still find this node).
        await tracker.announce(
            me.key,
            app=m.app,
            manifest_id=result.previous_id,
            port=port,
            event="stopped",
        )
    if port:
        await tracker.announce(
            me.key,
            app=m.app,
            manifest_id=m.id,
            port=port,
            event="completed",
            size=m.total_size,
            left=0,
            from_peers=result.bytes_peers,
            from_cdn=result.bytes_cdn,
        )
    reports = [
        PeerQualityReport(
            node_id=st.node_id,
            bytes=st.bytes,
            rate=int(st.rate),
            failures=st.failures,
            corrupt=st.corrupt,
        )
        for st in result.peers.values()
        if st.node_id
    ]
    if reports:
        await tracker.report(me.key, reports)
