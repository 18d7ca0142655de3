"""Open the stores a tracker runs on, as the command line names them, and build the app on
them (:class:`tracker.app.Tracker`)."""

from __future__ import annotations

from pathlib import Path

from .app import Tracker
from .backend import OpsStore, RegistryStore, SwarmStore
from .config import TrackerConfig, is_postgres_url
from .fleet_store import open_fleet
from .ops_sqlite import SQLiteOps
from .registry_sqlite import SQLiteRegistry
from .swarm_sqlite import SQLiteSwarm
from .traffic_store import open_traffic

__all__ = ["open_tracker"]


def open_tracker(
    config: TrackerConfig,
    data_dir: Path,
    redis_url: str | None = None,
    redis_prefix: str = "trk:",
    redis_mode: str = "script",
    *,
    registry_url: str | None = None,
) -> Tracker:
    """Open (creating if needed) the stores under ``data_dir`` and build the app.

    ``redis_mode``: ``script`` (state in Redis, one Lua script per announce) or ``log``
    (state in each replica's memory, changes ordered by a Redis stream: tracker.swarm_log).
    ``registry_url``: keep the registry, the operations store and the traffic series in that
    PostgreSQL database (``postgresql://``: tracker.registry_pg) or Redis
    (tracker.registry_redis, keys under ``redis_prefix``) instead of ``data_dir/registry.db``,
    ``ops.db`` and ``traffic.db``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    registry: RegistryStore
    ops: OpsStore
    db = None
    if is_postgres_url(registry_url):
        from .ops_pg import PGOps
        from .pg import PGDatabase
        from .registry_pg import PGRegistry

        db = PGDatabase(str(registry_url))
        registry, ops = PGRegistry(db), PGOps(db)
        traffic = open_traffic(data_dir, db=db)
    elif registry_url:
        from .ops_redis import RedisOps
        from .registry_redis import RedisRegistry

        registry = redis_registry = RedisRegistry(registry_url, prefix=redis_prefix)
        ops = RedisOps(redis_registry)
        traffic = open_traffic(data_dir, redis_registry)
    else:
        registry = SQLiteRegistry(data_dir / "registry.db")
        ops = SQLiteOps(data_dir / "ops.db")
        traffic = open_traffic(data_dir)
    swarm: SwarmStore
    if redis_url and redis_mode == "log":
        from .swarm_log import LogSwarm

        swarm = LogSwarm(redis_url, prefix=redis_prefix)
    elif redis_url:
        from .swarm_redis import RedisSwarm

        swarm = RedisSwarm(redis_url, prefix=redis_prefix)
    else:
        swarm = SQLiteSwarm(data_dir / "swarm.db")
    tracker = Tracker(config, registry, swarm, ops, traffic)
    tracker.fleet.store = open_fleet(redis_url, redis_prefix, db)
    return tracker
