"""Sources of peers, and asking several of them at once.

Theory of operation
-------------------
The swarm does not care where peers come from: it asks a ``PeerSource`` for the nodes serving a
manifest (and, as partial seeds, other builds of the same app) and gets back verified
``PeerRecord``s. Sources are the DHT (``DHTPeerSource``), the tracker and, later, the LAN.

Racing the sources (first answer wins, late answers still join the swarm) is
``p2pnode.discovery.race.Discovery.search``. Timeouts are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import trio

from .node import DHTNode
from .records import PeerRecord, Topic

__all__ = ["DHTPeerSource", "PeerSource", "merge_records"]


@runtime_checkable
class PeerSource(Protocol):
    """Anything that can name nodes serving a release."""

    name: str

    async def find_peers(self, manifest_id: bytes, app: str) -> list[PeerRecord]:
        """Verified, unexpired records of nodes serving ``manifest_id`` first, then nodes
        holding other builds of ``app`` (partial seeds).

        Raises:
            P2PNodeError: the source cannot be reached or used right now.
        """
        ...


def merge_records(*lists: Sequence[PeerRecord]) -> list[PeerRecord]:
    """Concatenate, keeping the first record per (announcer, topic kind): earlier lists win,
    so manifest records placed first are not displaced by the same node's app record."""
    seen: set[tuple[bytes, bytes]] = set()
    out: list[PeerRecord] = []
    for records in lists:
        for rec in records:
            marker = (rec.public_key, rec.topic.kind)
            if marker not in seen:
                seen.add(marker)
                out.append(rec)
    return out


class DHTPeerSource:
    """Peers from the DHT: the manifest's topic and the app's topic, looked up together.

    Args:
        node: a running DHT node.
        include_app: also look up the app topic for partial seeds of other builds.
        exclude_self: leave this node's own records out (the swarm never dials itself).
    """

    name = "dht"

    def __init__(
        self, node: DHTNode, *, include_app: bool = True, exclude_self: bool = True
    ) -> None:
        self.node = node
        self.include_app = include_app
        self.exclude_self = exclude_self

    async def find_peers(self, manifest_id: bytes, app: str) -> list[PeerRecord]:
        topics = [Topic.manifest(manifest_id)]
        if self.include_app:
            topics.append(Topic.app(app))
        results: list[list[PeerRecord]] = [[] for _ in topics]

        async def one(i: int, topic: Topic) -> None:
            results[i] = await self.node.lookup(topic)

        async with trio.open_nursery() as nursery:
            for i, topic in enumerate(topics):
                nursery.start_soon(one, i, topic)
        merged = merge_records(*results)
        if self.exclude_self:
            mine = self.node.core.node.id
            merged = [r for r in merged if r.node_id != mine]
        return merged
