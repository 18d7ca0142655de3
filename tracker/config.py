"""The tracker's settings (``tracker serve`` flags)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["TrackerConfig", "is_postgres_url"]


def is_postgres_url(url: str | None) -> bool:
    """Whether a ``--registry`` value names PostgreSQL (``tracker.registry_pg``); any other
    URL is a Redis one (``tracker.registry_redis``)."""
    return bool(url) and urlsplit(url or "").scheme in ("postgresql", "postgres")


@dataclass
class TrackerConfig:
    admin_token: str
    #: Seconds between a node's announces; a peer missing ``3 * interval`` is dropped.
    interval: int = 60
    min_interval: int = 10
    #: Requests per second per client address (0 = unlimited), and the burst allowed.
    client_rate: float = 50.0
    client_burst: float = 200.0
    #: Reports per second per reporting node, and the burst.
    report_rate: float = 0.2
    report_burst: float = 5.0
    #: DHT nodes (HOST:PORT) handed to nodes that join the DHT through this tracker.
    dht_bootstrap: tuple[str, ...] = ()
    clock: Callable[[], float] = time.time

    @property
    def ttl(self) -> int:
        return 3 * self.interval
