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

The update feed: each channel move bumps a sequence number (``seq``, from the registry) and
wakes :class:`tracker.feed.Feed`; a publish on another replica (sharing DIR, or the registry's
Redis) wakes it within ``FEED_POLL`` seconds, via :meth:`Tracker.watch`.

Where things live: the registry's routes (apps, channels, the feed, manifests) in
:mod:`tracker.channels`; node routes here, operator routes in :mod:`tracker.operator_http`.
What applies to every request (the per-client-address token bucket, 429 before any body is
read, and request metrics) is :class:`tracker.middleware.RequestMiddleware`; tokens are checked
by :mod:`tracker.auth`; counters are :mod:`tracker.metrics`. The stores sit behind
:mod:`tracker.backend`'s interfaces, picked by :func:`tracker.stores.open_tracker`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import blake3
import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pnode.discovery.tracker_api import (
    CLIENT_FIELD,
    OUTCOME_SPLIT_FIELDS,
    SESSION_HEADER,
    SIGNATURE_HEADER,
)

from . import core
from .alerts import AlertWatch
from .backend import AnnounceCommit, OpsStore, RegistryStore, ReportCommit, SwarmStore
from .channels import ChannelRoutes
from .config import TrackerConfig
from .core import MAX_SKEW
from .errors import (
    APIError,
    Conflict,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from .feed import Feed
from .fleet_http import FleetCollector, FleetRoutes
from .fleet_store import LocalFleet
from .keyrotation import RotationRoutes
from .load_http import LoadRoutes
from .metrics import TrackerMetrics
from .middleware import Buckets, RequestMiddleware
from .operations import Operations
from .operator_http import OperatorRoutes
from .outcomes import MAX_OUTCOME_BYTES, SERIES_HOURS, SERIES_STEP, parse_outcome, series_view
from .records import VerifiedRecords
from .releaseinfo import ReleaseInfos
from .sessions import AnnounceSessions
from .traffic_store import TrafficStore
from .troubles import Troubles
from .web import error_response, query_int, read_body

__all__ = ["Tracker", "TrackerConfig"]

#: How often a replica checks whether another one moved a channel (seconds).
FEED_POLL = 0.2

log = logging.getLogger(__name__)


class Tracker(OperatorRoutes):
    """The tracker service: an ASGI app plus its background duties.

    Args:
        config: tokens, intervals and limits.
        registry: apps, manifests, channels (:class:`tracker.backend.RegistryStore`).
        swarm: swarm state (:class:`tracker.backend.SwarmStore`).
        ops: outcomes, rollouts, audit log (:class:`tracker.backend.OpsStore`).
        traffic: bytes by source per minute, online hours, forecasts
            (:class:`tracker.traffic_store.TrafficStore`).
    """

    def __init__(
        self,
        config: TrackerConfig,
        registry: RegistryStore,
        swarm: SwarmStore,
        ops: OpsStore,
        traffic: TrafficStore,
    ) -> None:
        self.config = config
        self.registry = registry
        self.swarm = swarm
        self.ops = ops
        self.feed = Feed()
        self.metrics = TrackerMetrics()
        self._clients = Buckets(config.client_rate, config.client_burst)
        self._reporters = Buckets(config.report_rate, config.report_burst)
        #: install outcomes are rate-limited per node as reports are
        self._outcomers = Buckets(config.report_rate, config.report_burst)
        self.sessions = AnnounceSessions(config.admin_token)
        self._records = VerifiedRecords()
        self._known_manifests: dict[bytes, str] = {}
        #: port of the fast announce listener, advertised in answers (0: none)
        self.fast_port = 0
        self._answer_head: bytes | None = None
        self._troubles = Troubles()
        self.operations = Operations(
            config, registry, ops, self._registry_call, self.feed, self.metrics
        )
        self.infos = ReleaseInfos(registry, self._registry_call)
        #: the fleet view (tracker.fleet): in memory here; open_tracker may put it in Redis
        self.fleet = FleetRoutes(LocalFleet(), registry, config.clock)
        self.metrics.registry.register(FleetCollector(self.fleet))
        #: the dashboard banner's alerts (docs/alerts.yml's conditions, evaluated here)
        self._alerts = AlertWatch()
        self.channels = ChannelRoutes(
            config,
            registry,
            self._registry_call,
            self.feed,
            self.metrics,
            self.infos,
            self.operations,
        )
        #: bandwidth and load: the traffic series, forecasts, the release hour
        self.load = LoadRoutes(
            traffic, registry, swarm, lambda: self.fleet.store, config.admin_token, config.clock
        )
        self.channels.forecaster = self.load.published
        self.channels.on_move = self.operations.on_move = self.load.moved
        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(RequestMiddleware, clients=self._clients, metrics=self.metrics)],
            exception_handlers={APIError: self._api_error, Unavailable: self._api_error},
        )

    # ---------------------------------------------------------------- ASGI entry and plumbing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def set_fast_port(self, port: int) -> None:
        """Advertise the fast announce listener's port in announce answers (0: none)."""
        self.fast_port = port
        self._answer_head = None

    def client_wait(self, client: str) -> float:
        """The per-client rate limit: 0 if a request from ``client`` may go on (and is
        counted), else seconds until it may."""
        return self._clients.allow(client, time.monotonic())

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError | Unavailable)
        self.metrics.rejected.labels(exc.code).inc()
        if isinstance(exc, Unauthorized):
            await self.operations.refused(request, exc.message)
        return error_response(exc)

    def _routes(self) -> list[Route]:
        ch = self.channels
        return [
            Route("/healthz", self._healthz),
            Route("/metrics", self._metrics),
            Route("/openapi.json", self._openapi),
            Route("/", self._dashboard),
            Route("/dashboard", self._dashboard),
            Route("/dashboard/{name:str}", self._static),
            Route("/v1/apps", ch.apps, methods=["GET", "POST"]),
            Route("/v1/apps/{app:str}", ch.app_info),
            Route("/v1/apps/{app:str}/token", ch.rotate_token, methods=["POST"]),
            Route(
                "/v1/apps/{app:str}/rotations",
                RotationRoutes(ch).rotations,
                methods=["GET", "POST"],
            ),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/manifests",
                ch.publish,
                methods=["POST"],
            ),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/promote",
                ch.promote,
                methods=["POST"],
            ),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/rollback",
                ch.rollback,
                methods=["POST"],
            ),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/rollout",
                ch.rollout,
                methods=["GET", "POST"],
            ),
            Route("/v1/apps/{app:str}/channels/{channel:str}/history", ch.history),
            Route("/v1/apps/{app:str}/channels/{channel:str}/events", ch.events),
            Route("/v1/apps/{app:str}/channels/{channel:str}", ch.latest),
            Route("/v1/manifests/{manifest_id:str}", ch.manifest),
            Route("/v1/announce", self._announce, methods=["POST"]),
            Route("/v1/report", self._report, methods=["POST"]),
            Route("/v1/outcomes", self._outcomes, methods=["GET", "POST"]),
            Route("/v1/peers/{node_id:str}", self._peer, methods=["GET", "DELETE"]),
            Route("/v1/stats", self._stats),
            Route("/v1/audit", self.operations.audit),
            Route("/v1/apps/{app:str}/fleet", self.fleet.app_fleet),
            *self.load.routes(),
            Route("/v1/nodes/{node_id:str}", self.fleet.node),
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every background duty, until cancelled: the swarm store's own (it catches up with
        the log first, in log mode), then :meth:`watch`. Serve requests once started."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.swarm.run)
            await nursery.start(self.fleet.store.run)
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
                self.feed.notify()
            now = self.config.clock()
            if now - last_gc >= 10:
                last_gc = now
                try:
                    await self.swarm.gc(now)
                    await self.fleet.store.gc(now)
                    self._troubles.report("gc", None)
                except Unavailable as exc:  # the store is down: requests get 503s meanwhile
                    self._troubles.report("gc", exc.message)
                try:  # the traffic series is a report: whatever breaks it, serving goes on
                    await self.load.tick(now)
                    self._troubles.report("traffic series", None)
                except Exception as exc:
                    self._troubles.report("traffic series", repr(exc))

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
        body = await read_body(request, core.MAX_ANNOUNCE_BYTES)
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
        ``session``: a token from an earlier answer (``sessions.AnnounceSessions``); when it is
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
        self.metrics.announces[a.event].inc()
        self.fleet.announced(a, now)
        self.load.announced(a.app, now)
        head = self._answer_head
        if head is None:
            fast = f',"announce_port":{self.fast_port}' if self.fast_port else ""
            head = self._answer_head = (
                f'{{"interval":{self.config.interval},"min_interval":{self.config.min_interval},'
                f'"ttl":{self.config.ttl}{fast},"announce_fields":["{CLIENT_FIELD}"],'
                f'"outcome_fields":{_OUTCOME_FIELDS},'
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
        body = await read_body(request, core.MAX_REPORT_BYTES)
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
        self.metrics.reports.inc()
        return JSONResponse({"accepted": len(r.peers)})

    async def _outcomes(self, request: Request) -> Response:
        """POST: a node's signed install outcome; GET: the tally per build (``?app=``), and
        with ``?hours=N`` each build's hourly series."""
        if request.method == "GET":
            app = request.query_params.get("app")
            if app is not None:
                core.check_name(app, "app")
            hours = query_int(request, "hours", 1, SERIES_HOURS)
            labels = await self._registry_call(self.registry.releases)
            releases = await self._outcome_stats(app, labels)
            if hours is not None:  # and each build's hourly series over the last ``hours``
                since = int(self.config.clock() // SERIES_STEP) - hours + 1
                rows = await self._registry_call(self.ops.outcome_series, app, since)
                for r in releases:
                    r["series"] = series_view(rows.get(bytes.fromhex(r["manifest_id"]), []))
            return JSONResponse({"releases": releases})
        body = await read_body(request, MAX_OUTCOME_BYTES)
        now = self.config.clock()
        o = parse_outcome(body, request.headers.get(SIGNATURE_HEADER), now=now)
        wait = self._outcomers.allow(o.node_id, time.monotonic())
        if wait > 0:
            raise RateLimited(
                f"node {o.node_id.hex()} sends outcomes too often",
                fix=f"send at most {self.config.report_rate:g} outcomes/s; retry in {wait:.0f} s",
            )
        info = self.registry.manifest_info(o.manifest)
        if info is None or info[0] != o.app or info[1] != o.to_build:
            raise NotFound(
                f"build {o.to_build} of {o.app} is not manifest {o.manifest.hex()} here",
                fix="report outcomes of builds published on this tracker",
            )
        digest = blake3.blake3(bytes.fromhex(request.headers[SIGNATURE_HEADER])).digest()[:16]
        if not await self.operations.outcome(o, digest, now, 2 * MAX_SKEW):
            raise Conflict("this outcome was already received (a replay)")
        self.fleet.reported(o, now)
        self.load.reported(o, now)
        return JSONResponse({"accepted": True}, status_code=201)


#: The optional outcome fields this tracker takes, as announce answers list them (JSON).
_OUTCOME_FIELDS = "[" + ",".join(f'"{f}"' for f in OUTCOME_SPLIT_FIELDS) + "]"

# ------------------------------------------------------------------------------------ helpers


def _replay() -> Conflict:
    return Conflict(
        "this announce was already received (a replay)",
        fix="sign every announce with a fresh nonce and timestamp",
    )
