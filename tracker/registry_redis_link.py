"""The registry's link to Redis: its two clients, its circuit breaker and the translation of
redis-py's errors, shared by the registry (:class:`tracker.registry_redis.RedisRegistry`) and
the stores beside it on the same server (:mod:`tracker.ops_redis`, :mod:`tracker.traffic_redis`).

**Blocking.** redis-py is synchronous. The app runs every call that may reach Redis from a
request handler (writes, which carry manifests of up to 64 MiB; heads, channel lists, history,
the app list, release labels and manifest reads) in a worker thread
(``RedisRegistry.blocking``); only the cached lookups (``get_app``, ``manifest_info``,
asked synchronously by token checks and announces) run inline, and on a miss their client's
short timeouts hold the event loop for at most ``FAST_TIMEOUT``. After a failure to reach Redis
every call fails at once for ``DOWN_BACKOFF`` (a circuit breaker: requests do not each wait out
a timeout against a dead host) until a
:meth:`~tracker.registry_redis.RedisRegistry.data_version` probe, which the watcher makes every
0.2 s from a worker thread, gets through again.

**Errors.** Any Redis failure becomes :class:`RegistryUnavailable` (HTTP 503, JSON
``registry_unavailable``, naming the server and the cause). A change that fails this way was
either applied whole or not at all; if the connection dropped after Redis ran the script, a
retried publish is refused with 409 (the build is already there): read the channel's head.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from .errors import RegistryUnavailable

#: Seconds every call fails at once after Redis could not be reached (unless a probe succeeds).
DOWN_BACKOFF = 1.0
#: Connect timeout, and the read timeout of calls made on the event loop (small reads).
FAST_TIMEOUT = 1.0
#: Read timeout of calls made from worker threads (writes carrying up to 64 MiB; manifest reads).
SLOW_TIMEOUT = 10.0


def _where(url: str) -> str:
    """``host:port/db`` of a Redis URL, for messages (never the password)."""
    parts = urlsplit(url)
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLink:
    """A fast client (short timeouts, for calls made on the event loop) and a slow one (for
    worker threads), and the breaker every call goes through (:meth:`_redis`)."""

    def __init__(self, url: str) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.where = _where(url)

        def client(timeout: float) -> Any:
            # One retry on a fresh connection (a pooled one may be dead after a Redis restart);
            # redis-py's default (10 retries with backoff) would hold a request for seconds.
            return redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=FAST_TIMEOUT,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 1),
            )

        self._fast: Any = client(FAST_TIMEOUT)
        self._slow: Any = client(SLOW_TIMEOUT)
        self._down_until = 0.0

    def close(self) -> None:
        self._fast.close()
        self._slow.close()

    @contextmanager
    def _redis(self, what: str, *, probe: bool = False) -> Iterator[None]:
        """Translate redis-py's errors into :class:`RegistryUnavailable`; the circuit breaker.

        ``probe``: try even while the breaker is open (and close it on success).
        """
        import redis

        if not probe and time.monotonic() < self._down_until:
            raise RegistryUnavailable(
                f"cannot {what}: the registry's redis at {self.where} was unreachable "
                f"within the last {DOWN_BACKOFF:g} s"
            )
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._down_until = time.monotonic() + DOWN_BACKOFF
            raise RegistryUnavailable(
                f"cannot {what}: the registry's redis at {self.where} is unreachable ({exc})"
            ) from exc
        except redis.exceptions.RedisError as exc:  # e.g. READONLY, MISCONF, OOM, NOAUTH
            raise RegistryUnavailable(
                f"cannot {what}: the registry's redis at {self.where} refused: {exc}"
            ) from exc
        if probe:
            self._down_until = 0.0
