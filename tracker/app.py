"""The tracker's HTTP API: a Starlette app over the registry and the swarm store.

Theory of operation
-------------------
Handlers are thin: read the body under a size cap, parse and verify it with :mod:`tracker.core`
(pure), call the store, serialise. Every refusal is an :class:`~tracker.errors.APIError` raised
*before* anything is written, turned into ``{"error": code, "message": ..., "fix": ...}`` with its
4xx status by one exception handler.

Blocking work leaves the trio thread: Redis calls (redis-py is synchronous) and the parsing and
signature check of uploaded manifests (up to 64 MiB) run in ``trio.to_thread``; SQLite calls are
short and run inline.

The update feed: each channel move bumps a sequence number (``seq``, from the registry). A
node asks ``GET .../channels/CH?since=SEQ&wait=S``: the answer comes at once if the head moved
past ``SEQ``, else when it moves, else after ``S`` seconds with the unchanged head. The same
moves are pushed as server-sent events on ``.../events``. Waiters sleep on one ``trio.Event``
that is replaced at every move; a publish on this process wakes them at once, a publish on
another replica (sharing DIR, or the registry's Redis) within ``FEED_POLL`` seconds, via
:meth:`Tracker.watch`.

An outer ASGI wrapper (:class:`Tracker.__call__`) does what applies to every request: the
per-client-address token bucket (429 before any body is read) and request metrics (count,
latency, by route).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import blake3
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from p2pnode.discovery.dht.records import Topic, encode_bundle, parse_record
from p2pnode.discovery.tracker_api import SESSION_HEADER, SIGNATURE_HEADER
from p2pnode.errors import P2PNodeError
from p2pnode.ratelimit import TokenBucket
from p2pnode.release import keys
from p2pnode.release.manifest import MAX_MANIFEST_BYTES, parse_signed, verify

from . import core
from .backend import AnnounceCommit, RegistryStore, ReportCommit, SwarmStore
from .core import MAX_SKEW
from .errors import (
    APIError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from .openapi import openapi_document
from .registry_sqlite import SQLiteRegistry
from .swarm_sqlite import SQLiteSwarm
from .troubles import Troubles

__all__ = ["Tracker", "TrackerConfig", "open_tracker"]

#: How often a replica checks whether another one moved a channel (seconds).
FEED_POLL = 0.2
MAX_WAIT = 60.0

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 4096
#: Request latencies kept for the load figures in /v1/stats (a ring; about 1 MB).
LOAD_WINDOW = 20_000


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


def _token_hash(token: str) -> bytes:
    return blake3.blake3(token.encode()).digest()


class _Buckets:
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


class Tracker:
    """The tracker service: an ASGI app plus its background duties.

    Args:
        config: tokens, intervals and limits.
        registry: apps, manifests, channels (:class:`tracker.backend.RegistryStore`).
        swarm: swarm state (:class:`tracker.backend.SwarmStore`).
    """

    def __init__(self, config: TrackerConfig, registry: RegistryStore, swarm: SwarmStore) -> None:
        self.config = config
        self.registry = registry
        self.swarm = swarm
        self._changed = trio.Event()
        self._clients = _Buckets(config.client_rate, config.client_burst)
        self._reporters = _Buckets(config.report_rate, config.report_burst)
        self.sessions = core.AnnounceSessions(config.admin_token)
        self._records = _VerifiedRecords()
        self._known_manifests: dict[bytes, str] = {}
        self._load: deque[tuple[float, float]] = deque(maxlen=LOAD_WINDOW)
        self._started = time.monotonic()
        self._stats_cache: dict[str, Any] = {"releases": [], "quality": {}}
        self.metrics = CollectorRegistry(auto_describe=True)
        self.m_requests = Counter(
            "tracker_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.metrics,
        )
        self.m_latency = Histogram(
            "tracker_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.metrics,
        )
        self.m_announces = Counter(
            "tracker_announces", "Accepted announces, by event", ["event"], registry=self.metrics
        )
        self.m_reports = Counter(
            "tracker_reports", "Accepted peer-quality reports", registry=self.metrics
        )
        self.m_rejected = Counter(
            "tracker_rejected_requests",
            "Requests refused with a 4xx, by error code",
            ["code"],
            registry=self.metrics,
        )
        self.m_publishes = Counter(
            "tracker_channel_moves",
            "Channel moves, by action (publish, promote, rollback)",
            ["action"],
            registry=self.metrics,
        )
        self.metrics.register(_SwarmCollector(self))
        self._announce_counters = {e: self.m_announces.labels(e) for e in core.EVENTS}
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._announce_latency = self.m_latency.labels("announce")
        #: port of the fast announce listener, advertised in answers (0: none)
        self.fast_port = 0
        self._answer_head: bytes | None = None
        self._troubles = Troubles()
        self.app = Starlette(
            routes=self._routes(),
            exception_handlers={APIError: self._api_error, Unavailable: self._api_error},
        )

    # ---------------------------------------------------------------- ASGI entry and plumbing

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
        wait = self._clients.allow(client, time.monotonic())
        try:
            if wait > 0:
                self.m_rejected.labels("rate_limited").inc()
                err = RateLimited(f"more than {self.config.client_rate:g} requests/s from {client}")
                resp = _error_response(err, headers={"Retry-After": str(max(1, round(wait)))})
                await resp(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            dt = time.perf_counter() - t0
            endpoint = scope.get("endpoint")
            route = getattr(endpoint, "__name__", "other").lstrip("_")
            if wait > 0:
                route = "rate_limited"
            self.m_requests.labels(route, str(status[0])).inc()
            # Held requests (SSE, long-polls) last as long as the client asks: not latency.
            if route != "events" and not _held(scope):
                self.m_latency.labels(route).observe(dt)
                self._load.append((time.monotonic(), dt))

    def set_fast_port(self, port: int) -> None:
        """Advertise the fast announce listener's port in announce answers (0: none)."""
        self.fast_port = port
        self._answer_head = None

    def client_wait(self, client: str) -> float:
        """The per-client rate limit: 0 if a request from ``client`` may go on (and is
        counted), else seconds until it may."""
        return self._clients.allow(client, time.monotonic())

    def record_request(self, route: str, status: int, seconds: float, code: str | None) -> None:
        """Count a request answered outside Starlette (the fast announce listener)."""
        key = (route, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.m_requests.labels(route, str(status))
        counter.inc()
        if code is not None:
            self.m_rejected.labels(code).inc()
        self._announce_latency.observe(seconds)
        self._load.append((time.monotonic(), seconds))

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError | Unavailable)
        self.m_rejected.labels(exc.code).inc()
        return _error_response(exc)

    def _routes(self) -> list[Route]:
        return [
            Route("/healthz", self._healthz),
            Route("/metrics", self._metrics),
            Route("/openapi.json", self._openapi),
            Route("/", self._dashboard),
            Route("/dashboard", self._dashboard),
            Route("/dashboard/{name:str}", self._static),
            Route("/v1/apps", self._apps, methods=["GET", "POST"]),
            Route("/v1/apps/{app:str}", self._app_info),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/manifests",
                self._publish,
                methods=["POST"],
            ),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/promote",
                self._promote,
                methods=["POST"],
            ),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/rollback",
                self._rollback,
                methods=["POST"],
            ),
            Route("/v1/apps/{app:str}/channels/{channel:str}/history", self._history),
            Route("/v1/apps/{app:str}/channels/{channel:str}/events", self._events),
            Route("/v1/apps/{app:str}/channels/{channel:str}", self._latest),
            Route("/v1/manifests/{manifest_id:str}", self._manifest),
            Route("/v1/announce", self._announce, methods=["POST"]),
            Route("/v1/report", self._report, methods=["POST"]),
            Route("/v1/peers/{node_id:str}", self._peer, methods=["GET", "DELETE"]),
            Route("/v1/stats", self._stats),
            Route("/v1/dht/bootstrap", self._dht_bootstrap),
        ]

    async def _registry_call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Call the registry: in a worker thread when its calls may wait on the network."""
        if self.registry.blocking:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kw))
        return fn(*args, **kw)

    async def _registry_version(self) -> int | None:
        """The registry's change counter; ``None`` while a remote registry is unreachable (the
        watcher keeps going: requests meanwhile get 503 ``registry_unavailable``)."""
        try:
            return int(await self._registry_call(self.registry.data_version))
        except Unavailable:
            return None

    def notify(self) -> None:
        """Wake every feed waiter (a channel moved)."""
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every background duty, until cancelled: the swarm store's own (it catches up with
        the log first, in log mode), then :meth:`watch`. Serve requests once started."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.swarm.run)
            await nursery.start(self.watch)
            task_status.started()

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background duty: notice other replicas' channel moves, expire peers and replays."""
        version = await self._registry_version()
        task_status.started()
        last_gc = self.config.clock()
        while True:
            await trio.sleep(FEED_POLL)
            v = await self._registry_version()
            if v is not None and v != version:
                version = v
                self.notify()
            now = self.config.clock()
            if now - last_gc >= 10:
                last_gc = now
                try:
                    await self.swarm.gc(now)
                    self._troubles.report("gc", None)
                except Unavailable as exc:  # the store is down: requests get 503s meanwhile
                    self._troubles.report("gc", exc.message)

    # ---------------------------------------------------------------- auth

    def _bearer(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise Unauthorized("this request needs a token")
        return header[len("Bearer ") :].strip()

    def _require_admin(self, request: Request) -> str:
        token = self._bearer(request)
        if not hmac.compare_digest(token.encode(), self.config.admin_token.encode()):
            raise Unauthorized("the admin token is wrong", fix="pass the tracker's --admin-token")
        return "admin"

    def _require_publisher(self, request: Request, app: str) -> str:
        """Admin token, or the publisher token issued when ``app`` was registered."""
        token = self._bearer(request)
        if hmac.compare_digest(token.encode(), self.config.admin_token.encode()):
            return "admin"
        row = self.registry.get_app(app)
        if row is not None and hmac.compare_digest(_token_hash(token), row.token_hash):
            return "publisher"
        raise Unauthorized(
            f"the token is neither the admin token nor {app}'s publisher token",
            fix="use the publisher token printed by `tracker app add`",
        )

    def _app_row(self, app: str) -> Any:
        core.check_name(app, "app")
        row = self.registry.get_app(app)
        if row is None:
            raise NotFound(f"app {app} is not registered", fix="register it: tracker app add")
        return row

    # ---------------------------------------------------------------- operators

    async def _healthz(self, request: Request) -> Response:
        try:
            await self._registry_call(self.registry.data_version)
            await self.swarm.check()
        except Exception as exc:  # health must answer, whatever broke
            return JSONResponse({"status": "down", "error": repr(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _dht_bootstrap(self, request: Request) -> Response:
        """DHT nodes to join through: nodes given only a tracker URL still reach the DHT, which
        then keeps working for them when this tracker is down."""
        return JSONResponse({"nodes": list(self.config.dht_bootstrap)})

    async def _refresh_stats(self) -> dict[str, Any]:
        stats = await self.swarm.stats(self.config.clock())
        labels = await self._registry_call(self.registry.releases)
        for r in stats["releases"]:
            info = labels.get(bytes.fromhex(r["manifest_id"]))
            r["build"], r["version"] = (info[1], info[2]) if info else (None, None)
        stats["releases"].sort(key=lambda r: (r["app"], -(r["build"] or 0)))
        stats["load"] = self._load_stats()
        self._stats_cache = stats
        return stats

    def _load_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        window = min(10.0, max(1e-3, now - self._started))
        recent = sorted(d for t, d in self._load if t >= now - window)
        n = len(recent)

        def pct(p: float) -> float:
            return recent[min(n - 1, int(p * n))] * 1000 if n else 0.0

        return {
            "window_s": round(window, 3),
            "requests_per_s": round(n / window, 2),
            "p50_ms": round(pct(0.50), 3),
            "p99_ms": round(pct(0.99), 3),
        }

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(await self._refresh_stats())

    async def _metrics(self, request: Request) -> Response:
        await self._refresh_stats()
        body = generate_latest(self.metrics)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def _dashboard(self, request: Request) -> Response:
        return Response(_asset("dashboard.html"), media_type="text/html; charset=utf-8")

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        types = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
        if name not in types:
            raise NotFound(f"no dashboard asset {name}")
        return Response(_asset(name), media_type=types[name] + "; charset=utf-8")

    async def _peer(self, request: Request) -> Response:
        text = request.path_params["node_id"]
        if len(text) != 40:
            raise BadRequest("node id must be 40 hex digits")
        try:
            node = bytes.fromhex(text)
        except ValueError as exc:
            raise BadRequest("node id must be 40 hex digits") from exc
        if request.method == "DELETE":
            self._require_admin(request)
            cleared = await self.swarm.clear_peer(node)
            return JSONResponse({"node_id": text, "cleared": cleared})
        q = await self.swarm.quality(node)
        return JSONResponse(
            {
                "node_id": text,
                "score": round(q.score, 4),
                "flagged": q.flagged,
                "mib_received": round(q.mib, 3),
                "failures": q.failures,
                "corrupt": q.corrupt,
                "rate": round(q.rate),
                "reports": q.reports,
                "corrupt_reporters": q.corrupt_reporters,
            }
        )

    # ---------------------------------------------------------------- apps and channels

    async def _apps(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(
                {
                    "apps": [
                        {"app": a.name, "key": keys.format_public_key(a.key)}
                        for a in await self._registry_call(self.registry.list_apps)
                    ]
                }
            )
        self._require_admin(request)
        obj = core.json_object(await _read_body(request, MAX_JSON_BYTES))
        app = core.check_name(obj.get("app"), "app")  # type: ignore[arg-type]
        key_text = obj.get("key")
        if not isinstance(key_text, str):
            raise BadRequest("key must be ed25519:<64 hex>")
        try:
            key = keys.parse_public_key(key_text)
        except P2PNodeError as exc:
            raise BadRequest("key must be ed25519:<64 hex>") from exc
        token = "pub_" + secrets.token_urlsafe(32)
        await self._registry_call(
            self.registry.add_app, app, key, _token_hash(token), self.config.clock()
        )
        return JSONResponse(
            {"app": app, "key": keys.format_public_key(key), "publisher_token": token},
            status_code=201,
        )

    async def _app_info(self, request: Request) -> Response:
        row = self._app_row(request.path_params["app"])
        heads = await self._registry_call(self.registry.channels, row.name)
        return JSONResponse(
            {
                "app": row.name,
                "key": keys.format_public_key(row.key),
                "channels": [h.to_json() for h in heads],
            }
        )

    def _channel(self, request: Request) -> tuple[Any, str]:
        row = self._app_row(request.path_params["app"])
        channel = core.check_name(request.path_params["channel"], "channel")
        return row, channel

    async def _publish(self, request: Request) -> Response:
        row, channel = self._channel(request)
        actor = self._require_publisher(request, row.name)
        body = await _read_body(request, MAX_MANIFEST_BYTES + 1024)
        now = self.config.clock()

        def check() -> Any:
            signed = parse_signed(body, source="uploaded manifest")
            verify(signed, {row.key}, now=now)
            return signed

        try:
            signed = await trio.to_thread.run_sync(check)
        except P2PNodeError as exc:
            raise _refusal(exc) from exc
        m = signed.manifest
        if m.app != row.name:
            raise BadRequest(f"the manifest is for app {m.app}, not {row.name}")
        if m.channel != channel:
            raise BadRequest(
                f"the manifest is signed for channel {m.channel}, not {channel}",
                fix=f"publish to {m.channel}, then promote it to {channel}",
            )
        mid = signed.id
        seq = await self._registry_call(
            self.registry.publish,
            app=row.name,
            channel=channel,
            manifest_id=mid,
            build=m.build,
            version=m.version,
            size=m.total_size,
            signed=body,
            now=now,
            actor=actor,
        )
        self.m_publishes.labels("publish").inc()
        self.notify()
        return JSONResponse(
            {
                "app": row.name,
                "channel": channel,
                "seq": seq,
                "manifest_id": mid.hex(),
                "build": m.build,
                "version": m.version,
            },
            status_code=201,
        )

    async def _move(self, request: Request, action: str) -> Response:
        row, channel = self._channel(request)
        actor = self._require_publisher(request, row.name)
        obj = core.json_object(await _read_body(request, MAX_JSON_BYTES) or b"{}")
        target = obj.get("manifest_id")
        if target is None and action == "rollback":
            mid = await self._registry_call(self.registry.previous_head, row.name, channel)
            if mid is None:
                raise Conflict(
                    f"channel {channel} of {row.name} has no earlier build to roll back to",
                    fix="pass manifest_id explicitly",
                )
        elif target is None:
            raise BadRequest("manifest_id is required")
        else:
            mid = core.check_manifest_id(target)
        await self._registry_call(
            self.registry.move,
            app=row.name,
            channel=channel,
            manifest_id=mid,
            action=action,
            now=self.config.clock(),
            actor=actor,
        )
        self.m_publishes.labels(action).inc()
        self.notify()
        head = await self._registry_call(self.registry.head, row.name, channel)
        if head is None:  # the move just committed; only a concurrent delete could do this
            raise NotFound(f"channel {channel} vanished")
        return JSONResponse(head.to_json())

    async def _promote(self, request: Request) -> Response:
        return await self._move(request, "promote")

    async def _rollback(self, request: Request) -> Response:
        return await self._move(request, "rollback")

    async def _history(self, request: Request) -> Response:
        row, channel = self._channel(request)
        history = await self._registry_call(self.registry.history, row.name, channel)
        return JSONResponse({"app": row.name, "channel": channel, "history": history})

    async def _latest(self, request: Request) -> Response:
        row, channel = self._channel(request)
        since = _query_int(request, "since", -1, 1 << 62)
        wait = _query_float(request, "wait", 0.0, MAX_WAIT)
        head = await self._registry_call(self.registry.head, row.name, channel)
        if since is not None and wait > 0:
            with trio.move_on_after(wait):
                while head is None or head.seq <= since:
                    await self._changed.wait()
                    head = await self._registry_call(self.registry.head, row.name, channel)
        if head is None:
            raise NotFound(
                f"nothing is published to channel {channel} of {row.name} yet",
                fix="publish a build first (or wait with ?since=0&wait=S)",
            )
        return JSONResponse(head.to_json())

    async def _events(self, request: Request) -> Response:
        row, channel = self._channel(request)
        since = _query_int(request, "since", -1, 1 << 62)

        async def stream() -> AsyncIterator[bytes]:
            last = -1 if since is None else since
            yield b"retry: 1000\n\n"
            while True:
                head = await self._registry_call(self.registry.head, row.name, channel)
                if head is not None and head.seq > last:
                    last = head.seq
                    data = json.dumps(head.to_json())
                    yield f"id: {head.seq}\nevent: release\ndata: {data}\n\n".encode()
                with trio.move_on_after(15):
                    await self._changed.wait()
                    continue
                yield b": keepalive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _manifest(self, request: Request) -> Response:
        mid = core.check_manifest_id(request.path_params["manifest_id"])
        raw = await self._registry_call(self.registry.get_manifest, mid)
        if raw is None:
            raise NotFound(f"manifest {mid.hex()} is not stored here")
        return Response(
            raw,
            media_type="application/x-p2pnode-manifest",
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )

    # ---------------------------------------------------------------- nodes

    def _manifest_app(self, mid: bytes) -> str | None:
        app = self._known_manifests.get(mid)
        if app is None:
            info = self.registry.manifest_info(mid)
            if info is None:
                return None
            app = self._known_manifests[mid] = info[0]
        return app

    async def _announce(self, request: Request) -> Response:
        body = await _read_body(request, core.MAX_ANNOUNCE_BYTES)
        seen_ip = (request.client.host if request.client else "127.0.0.1") or "127.0.0.1"
        answer = await self.announce(
            body,
            request.headers.get(SIGNATURE_HEADER),
            seen_ip,
            request.headers.get(SESSION_HEADER),
        )
        return Response(answer, media_type="application/json")

    async def announce(
        self, body: bytes, signature: str | None, seen_ip: str, session: str | None = None
    ) -> bytes:
        """Verify, apply and answer one announce; the answer's JSON bytes.

        Shared by the HTTP route and the fast announce listener (:mod:`tracker.fastpath`).
        ``session``: a token from an earlier answer (``core.AnnounceSessions``); when it is
        valid for the announcing key and ``seen_ip`` the signature is not verified again.

        Raises:
            APIError: the announce is refused (nothing was stored).
        """
        now = self.config.clock()
        vouched = False

        def by_session(node_id: bytes) -> bool:
            nonlocal vouched
            vouched = self.sessions.valid(session, node_id, seen_ip, now)
            return vouched

        a = core.parse_announce(body, signature, now=now, vouched=by_session if session else None)
        app = self._manifest_app(a.manifest)
        if app is None or app != a.app:
            raise NotFound(
                f"manifest {a.manifest.hex()} is not a build of {a.app} published here",
                fix="announce only manifests this tracker published",
            )
        ip = core.plausible_ip(a.ip, seen_ip)
        bundle = self._records.check(a, now) if a.records else None
        assert signature is not None  # parse_announce checked it
        digest = blake3.blake3(bytes.fromhex(signature)).digest()[:16]
        commit = AnnounceCommit(a, ip, bundle, now, self.config.ttl, digest, 2 * MAX_SKEW)
        answer = await self.swarm.announce(commit)
        if answer is None:
            raise _replay()
        self._announce_counters[a.event].inc()
        head = self._answer_head
        if head is None:
            fast = f',"announce_port":{self.fast_port}' if self.fast_port else ""
            head = self._answer_head = (
                f'{{"interval":{self.config.interval},"min_interval":{self.config.min_interval},'
                f'"ttl":{self.config.ttl}{fast},'
            ).encode()
        issued = b""
        if not vouched:  # the signature was verified: vouch for the next announces
            token = self.sessions.issue(a.node_id, seen_ip, now)
            issued = b'"session":"%s","session_ttl":%d,' % (token.encode(), self.sessions.ttl)
        return b"".join(
            (
                head,
                issued,
                b'"node_id":"',
                a.node_id.hex().encode(),
                b'","ip":"',
                ip.encode(),  # an address literal (validated, or the socket's): nothing to escape
                b'","seeders":%d,"leechers":%d,"peers":[' % (answer.seeders, answer.leechers),
                b",".join(answer.peers),
                b"]}",
            )
        )

    async def _report(self, request: Request) -> Response:
        body = await _read_body(request, core.MAX_REPORT_BYTES)
        now = self.config.clock()
        r = core.parse_report(body, request.headers.get(SIGNATURE_HEADER), now=now)
        wait = self._reporters.allow(r.node_id, time.monotonic())
        if wait > 0:
            raise RateLimited(
                f"node {r.node_id.hex()} sends reports too often",
                fix=f"send at most {self.config.report_rate:g} reports/s; retry in {wait:.0f} s",
            )
        digest = blake3.blake3(bytes.fromhex(request.headers[SIGNATURE_HEADER])).digest()[:16]
        fresh = await self.swarm.report(ReportCommit(r, now, digest, 2 * MAX_SKEW))
        if not fresh:
            raise Conflict("this report was already received (a replay)")
        self.m_reports.inc()
        return JSONResponse({"accepted": len(r.peers)})


# ------------------------------------------------------------------------------------ helpers


def _asset(name: str) -> bytes:
    return resources.files("tracker").joinpath("static", name).read_bytes()


def _error_response(
    err: APIError | Unavailable, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": err.code, "message": err.message, "fix": err.fix},
        status_code=err.status,
        headers=headers,
    )


def _replay() -> Conflict:
    return Conflict(
        "this announce was already received (a replay)",
        fix="sign every announce with a fresh nonce and timestamp",
    )


def _refusal(exc: P2PNodeError) -> APIError:
    """A manifest problem as an HTTP refusal: trust failures are 403, format problems 400."""
    from p2pnode.errors import IntegrityError

    cls: type[APIError] = Forbidden if isinstance(exc, IntegrityError) else BadRequest
    return cls(f"manifest refused: {exc.message}", fix=exc.fix)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError as exc:
            raise BadRequest("Content-Length is not a number") from exc
        if n > limit:
            raise TooLarge(f"request body of {n} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _query_int(request: Request, name: str, lo: int, hi: int) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be an integer") from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be in [{lo}, {hi}]")
    return value


def _query_float(request: Request, name: str, lo: float, hi: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be a number") from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be in [{lo}, {hi}]")
    return value


class _VerifiedRecords:
    """The DHT peer records nodes attach, verified once: a node re-sends the same records on
    every announce until they are half expired, and each costs an Ed25519 check (~150 us), so
    a bounded LRU of what was verified (keyed by announcer, build, app and the exact bytes)
    spares the repeats. An entry lives no longer than its records."""

    MAX = 65_536

    def __init__(self) -> None:
        self._ok: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self.checked = 0

    def check(self, a: core.Announce, now: float) -> bytes:
        """Verify the records ``a`` carries, so the tracker relays only what the node itself
        signed for this app or manifest (clients re-verify; see docs/discovery.md); returns
        them as a bundle."""
        parts = (a.public_key, a.manifest, a.app.encode(), *a.records)
        key = blake3.blake3(b"".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()
        hit = self._ok.get(key)
        if hit is not None and hit[0] > now:
            self._ok.move_to_end(key)
            return hit[1]
        good = []
        wanted = {Topic.manifest(a.manifest), Topic.app(a.app)}
        for raw in a.records:
            try:
                rec = parse_record(raw, now=now)
            except P2PNodeError as exc:
                raise BadRequest(f"attached peer record refused: {exc.message}") from exc
            if rec.public_key != a.public_key or rec.topic not in wanted:
                raise Forbidden("attached peer records must be the announcer's, for this app/build")
            good.append(rec)
        self.checked += 1
        bundle = encode_bundle(good)
        self._ok[key] = (min(r.expires for r in good), bundle)
        if len(self._ok) > self.MAX:
            self._ok.popitem(last=False)
        return bundle


class _SwarmCollector:
    """Prometheus view of the swarm, from the stats gathered just before each scrape."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        stats = self.tracker._stats_cache
        labels = ["app", "version", "manifest"]
        seeders = GaugeMetricFamily(
            "tracker_swarm_seeders", "Live seeders per release", labels=labels
        )
        leechers = GaugeMetricFamily(
            "tracker_swarm_leechers", "Live leechers per release", labels=labels
        )
        completed = CounterMetricFamily(
            "tracker_release_completed", "Completed downloads per release", labels=labels
        )
        from_peers = CounterMetricFamily(
            "tracker_release_from_peers_bytes",
            "Bytes nodes received from peers, per release",
            labels=labels,
        )
        from_cdn = CounterMetricFamily(
            "tracker_release_from_cdn_bytes",
            "Bytes nodes received from the CDN, per release",
            labels=labels,
        )
        offload = GaugeMetricFamily(
            "tracker_release_offload_ratio",
            "Share of bytes that came from peers rather than the CDN, per release",
            labels=labels,
        )
        for r in stats.get("releases", []):
            lv = [r["app"], str(r.get("version")), r["manifest_id"]]
            seeders.add_metric(lv, r["seeders"])
            leechers.add_metric(lv, r["leechers"])
            completed.add_metric(lv, r["completed"])
            from_peers.add_metric(lv, r["bytes_from_peers"])
            from_cdn.add_metric(lv, r["bytes_from_cdn"])
            offload.add_metric(lv, r["offload_ratio"])
        yield from (seeders, leechers, completed, from_peers, from_cdn, offload)
        q = stats.get("quality", {})
        dist = GaugeMetricFamily(
            "tracker_peer_quality_peers",
            "Scored peers per quality-score bucket (lower bound of a 0.1-wide bucket)",
            labels=["score_ge"],
        )
        for i, n in enumerate(q.get("histogram", [0] * 10)):
            dist.add_metric([f"{i / 10:.1f}"], n)
        yield dist
        yield GaugeMetricFamily(
            "tracker_peers_flagged",
            "Peers flagged for sending corrupt data to several reporters",
            value=len(q.get("flagged", [])),
        )


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
    ``registry_url``: keep the registry in that Redis (tracker.registry_redis, keys under
    ``redis_prefix``) instead of ``data_dir/registry.db``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    registry: RegistryStore
    if registry_url:
        from .registry_redis import RedisRegistry

        registry = RedisRegistry(registry_url, prefix=redis_prefix)
    else:
        registry = SQLiteRegistry(data_dir / "registry.db")
    swarm: SwarmStore
    if redis_url and redis_mode == "log":
        from .swarm_log import LogSwarm

        swarm = LogSwarm(redis_url, prefix=redis_prefix)
    elif redis_url:
        from .swarm_redis import RedisSwarm

        swarm = RedisSwarm(redis_url, prefix=redis_prefix)
    else:
        swarm = SQLiteSwarm(data_dir / "swarm.db")
    return Tracker(config, registry, swarm)


def _held(scope: Any) -> bool:
    """A long-poll: the client asked the tracker to hold the request (``wait`` > 0)."""
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        return float(query.get("wait", ["0"])[0]) > 0
    except ValueError:
        return False
