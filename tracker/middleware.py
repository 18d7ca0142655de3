"""What applies to every request on the Starlette port, before and after its handler.

:class:`RequestMiddleware` refuses a client over its request rate (429 with ``Retry-After``,
before any body is read) and counts every request by route and status, with its latency
(:class:`tracker.metrics.TrackerMetrics`). The route is the handler's name, which Starlette's
router leaves in the scope.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from p2pnode.ratelimit import TokenBucket

from .errors import RateLimited
from .metrics import TrackerMetrics
from .web import error_response

__all__ = ["Buckets", "RequestMiddleware"]


class Buckets:
    """Token buckets per key, LRU-bounded so a flood of addresses cannot grow memory."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65_536) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._b: OrderedDict[Any, TokenBucket] = OrderedDict()

    def allow(self, key: Any, now: float) -> float:
        """0 if allowed (and debited), else seconds until one token is there."""
        if self.rate <= 0:
            return 0.0
        b = self._b.get(key)
        if b is None:
            b = self._b[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._b) > self.max_keys:
                self._b.popitem(last=False)
        else:
            self._b.move_to_end(key)
        have = b.tokens(now)
        if have < 1:
            return (1 - have) / self.rate
        b.consume(1, now)
        return 0.0


class RequestMiddleware:
    """The per-client-address rate limit and the request metrics (see the module docstring).

    Args:
        app: the Starlette app (its routes and error handlers).
        clients: the per-address buckets (shared with the fast announce listener).
        metrics: where requests are counted.
    """

    def __init__(self, app: ASGIApp, *, clients: Buckets, metrics: TrackerMetrics) -> None:
        self.app, self.clients, self.metrics = app, clients, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        client = (scope.get("client") or ("?", 0))[0]
        wait = self.clients.allow(client, time.monotonic())
        try:
            if wait > 0:
                self.metrics.rejected.labels("rate_limited").inc()
                err = RateLimited(f"more than {self.clients.rate:g} requests/s from {client}")
                resp = error_response(err, headers={"Retry-After": str(max(1, round(wait)))})
                await resp(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            dt = time.perf_counter() - t0
            endpoint = scope.get("endpoint")
            route = getattr(endpoint, "__name__", "other").lstrip("_")
            if wait > 0:
                route = "rate_limited"
            self.metrics.record(route, status[0], dt, held=route == "events" or _held(scope))


def _held(scope: Scope) -> bool:
    """A long-poll: the client asked the tracker to hold the request (``wait`` > 0)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        return float(query.get("wait", ["0"])[0]) > 0
    except ValueError:
        return False
