"""Sources of peers, and asking several of them at once.

Theory of operation
-------------------
The swarm does not care where peers come from: it asks a ``PeerSource`` for the nodes serving a
manifest (and, as partial seeds, other builds of the same app) and gets back verified
``PeerRecord``s. Sources are the DHT (``DHTPeerSource``), the tracker and, later, the LAN.

``FirstAnswer`` asks every source at once and returns the first non-empty answer, cancelling
the rest: with the tracker down the DHT answers, with the DHT empty the tracker does, and when
both work the faster one wins. A source that fails (any ``P2PNodeError``) or answers with
nothing does not end the race; only when every source has failed does ``FirstAnswer`` raise,
and when some answered "nobody" it returns an empty list. ``grace`` optionally keeps listening
a little after the first answer to merge in a slightly slower source.

Timeouts are the caller's: wrap ``find_peers`` in ``trio.move_on_after``/``fail_after``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import trio

from ..errors import P2PNodeError, TransportError
from .node import DHTNode
from .records import PeerRecord, Topic

__all__ = ["DHTPeerSource", "DiscoveryError", "FirstAnswer", "PeerSource", "merge_records"]


class DiscoveryError(TransportError):
    """No peer source could be asked (every one of them failed)."""

    default_fix = "check the tracker URL and --dht-bootstrap nodes; the CDN is used meanwhile"


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


class FirstAnswer:
    """Ask every source at once; use whichever gives a non-empty answer first.

    Args:
        sources: the sources to race.
        grace: seconds to keep listening after the first answer, merging what else arrives.
    """

    name = "first-answer"

    def __init__(self, sources: Sequence[PeerSource], *, grace: float = 0.0) -> None:
        if not sources:
            raise RuntimeError("FirstAnswer needs at least one source")
        self.sources = list(sources)
        self.grace = grace
        self.last_winner: str | None = None
        self.last_errors: dict[str, P2PNodeError] = {}

    async def find_peers(self, manifest_id: bytes, app: str) -> list[PeerRecord]:
        answers: list[tuple[str, list[PeerRecord]]] = []
        errors: dict[str, P2PNodeError] = {}
        first_at = math.inf

        async with trio.open_nursery() as nursery:

            async def ask(source: PeerSource) -> None:
                nonlocal first_at
                try:
                    records = await source.find_peers(manifest_id, app)
                except P2PNodeError as exc:
                    errors[source.name] = exc
                    return
                answers.append((source.name, records))
                if records and first_at == math.inf:
                    first_at = trio.current_time()
                    nursery.cancel_scope.deadline = first_at + self.grace

            for source in self.sources:
                nursery.start_soon(ask, source)

        self.last_errors = errors
        nonempty = [(name, recs) for name, recs in answers if recs]
        if nonempty:
            self.last_winner = nonempty[0][0]
            return merge_records(*(recs for _, recs in nonempty))
        self.last_winner = None
        if answers:
            return []
        detail = "; ".join(f"{name}: {exc.message}" for name, exc in errors.items())
        raise DiscoveryError(f"no peer source answered ({detail})")
