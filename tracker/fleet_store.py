"""Where the fleet view lives: the interface the app uses, and the one-process store.

Theory of operation
-------------------
Recording must not slow the announce path, so :meth:`FleetStore.seen` and
:meth:`FleetStore.outcome` are synchronous and cheap: the in-memory store applies them at once
(:class:`tracker.fleet.MemoryFleet`), the Redis one (:mod:`tracker.fleet_redis`) coalesces them
and writes them behind from its :meth:`FleetStore.run` duty. Views are async because the Redis
one reads the server.

Which store: a tracker whose registry is in PostgreSQL keeps the fleet in that database
(:mod:`tracker.fleet_pg`), whether or not its swarm is in Redis: the fleet is history (which
build each node ran, when it was last seen, its outcomes, the adoption curves), durable like
the registry, outcomes and audit log beside it, while Redis keeps what changes on every
announce and may be lost (peer lists, counters, the replay guard). Recording never waits on
the database (write-behind, below), so the announce path costs the same either way. Otherwise
a tracker whose swarm is in Redis (replicas) shares one fleet there, since each replica hears
only some of the announces, and a single-process tracker (the SQLite default) keeps it in
memory. In Redis and in memory the fleet is soft state like the swarm: after a restart every
running node is back in it within one announce interval; only the adoption curves start again.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .fleet import FleetOutcome, MemoryFleet, Sighting

if TYPE_CHECKING:
    from .pg import PGDatabase

__all__ = ["FleetStore", "LocalFleet", "open_fleet"]


class FleetStore(Protocol):
    """Seats of the fleet (see :mod:`tracker.fleet`), recorded now and read later."""

    def seen(self, s: Sighting) -> None: ...

    def outcome(self, o: FleetOutcome) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background duties (write-behind), until cancelled."""
        ...

    async def gc(self, now: float) -> int:
        """Sample the adoption curves, expire a slice of the seats; how many went."""
        ...

    async def app_view(self, app: str, now: float) -> dict[str, Any] | None:
        """The app's fleet; each build's adoption curve ends with its count ``now``."""
        ...

    async def node_view(self, node: bytes) -> dict[str, Any] | None: ...

    async def gauges(self) -> dict[str, Any]:
        """``MemoryFleet.gauges``' shape: seats per build, per client version, updating."""
        ...

    def close(self) -> None: ...


class LocalFleet:
    """The fleet of one tracker process, in its memory."""

    def __init__(self, fleet: MemoryFleet | None = None) -> None:
        self.fleet = MemoryFleet() if fleet is None else fleet

    def seen(self, s: Sighting) -> None:
        self.fleet.seen(s)

    def outcome(self, o: FleetOutcome) -> None:
        self.fleet.outcome(o)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(math.inf)

    async def gc(self, now: float) -> int:
        return self.fleet.gc(now)

    async def app_view(self, app: str, now: float) -> dict[str, Any] | None:
        return self.fleet.app_view(app, now)

    async def node_view(self, node: bytes) -> dict[str, Any] | None:
        return self.fleet.node_view(node)

    async def gauges(self) -> dict[str, Any]:
        return self.fleet.gauges()

    def close(self) -> None:
        pass


def open_fleet(redis_url: str | None, prefix: str, db: PGDatabase | None = None) -> FleetStore:
    """The PostgreSQL fleet beside a PostgreSQL registry (``db``), also when the swarm is in
    Redis; else the Redis one beside a Redis swarm (keys under ``prefix``); else the local one."""
    if db is not None:
        from .fleet_pg import PGFleet

        return PGFleet(db)
    if redis_url:
        from .fleet_redis import RedisFleet

        return RedisFleet(redis_url, prefix=prefix)
    return LocalFleet()
