"""The operators' routes of the tracker's app (:class:`tracker.app.Tracker`): health, the DHT
bootstrap list, stats and metrics, this API's OpenAPI document, the dashboard and its assets,
and a peer's quality record (read, or cleared by an admin).

A part of :class:`~tracker.app.Tracker` (which inherits it) rather than a class of its own like
:mod:`tracker.channels`' routes: the handlers read the app's own stores and caches, declared
here and set by ``Tracker.__init__``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .alerts import AlertWatch
from .auth import require_admin
from .backend import OpsStore, RegistryStore, SwarmStore
from .config import TrackerConfig
from .errors import BadRequest, NotFound
from .fleet_http import FleetRoutes
from .metrics import TrackerMetrics
from .openapi import openapi_document
from .operations import Operations
from .releaseinfo import ReleaseInfos
from .web import asset

__all__ = ["OperatorRoutes"]


class OperatorRoutes:
    """The operators' handlers; :class:`tracker.app.Tracker` sets the state they read."""

    config: TrackerConfig
    registry: RegistryStore
    swarm: SwarmStore
    ops: OpsStore
    metrics: TrackerMetrics
    operations: Operations
    infos: ReleaseInfos
    fleet: FleetRoutes
    _alerts: AlertWatch
    _registry_call: Callable[..., Awaitable[Any]]

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
        await self.fleet.refresh()
        labels = await self._registry_call(self.registry.releases)
        for r in stats["releases"]:
            info = labels.get(bytes.fromhex(r["manifest_id"]))
            r["build"], r["version"] = (info[1], info[2]) if info else (None, None)
            r.update(await self.infos.fields(bytes.fromhex(r["manifest_id"])))
        stats["releases"].sort(key=lambda r: (r["app"], -(r["build"] or 0)))
        stats["load"] = self.metrics.load()
        self.metrics.stats_cache = stats
        stats["outcomes"] = self.metrics.outcomes_cache = await self._outcome_stats(None, labels)
        rollouts = await self._registry_call(self.ops.rollouts)
        stats["rollouts"] = self.metrics.rollouts_cache = [r.view() for r in rollouts]
        return stats

    async def _outcome_stats(
        self, app: str | None, labels: dict[bytes, tuple[str, int, str]]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = await self._registry_call(self.ops.outcome_stats, app)
        for r in out:
            info = labels.get(bytes.fromhex(r["manifest_id"]))
            r["version"] = info[2] if info else None
        return out

    async def _stats(self, request: Request) -> Response:
        stats = await self._refresh_stats()
        alerts = self._alerts.evaluate(stats, self.metrics.outcomes_cache, self.config.clock())
        stats["alerts"] = [a.to_json() for a in alerts]
        return JSONResponse(stats)

    async def _metrics(self, request: Request) -> Response:
        await self._refresh_stats()
        body = self.metrics.exposition()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def _dashboard(self, request: Request) -> Response:
        return Response(asset("dashboard.html"), media_type="text/html; charset=utf-8")

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        types = {
            "dashboard.js": "text/javascript",
            "dashboard.css": "text/css",
            "fleet.js": "text/javascript",
            "fleet.css": "text/css",
            "load.js": "text/javascript",
            "outcomes.js": "text/javascript",
        }
        if name not in types:
            raise NotFound(f"no dashboard asset {name}")
        return Response(asset(name), media_type=types[name] + "; charset=utf-8")

    async def _peer(self, request: Request) -> Response:
        text = request.path_params["node_id"]
        if len(text) != 40:
            raise BadRequest("node id must be 40 hex digits")
        try:
            node = bytes.fromhex(text)
        except ValueError as exc:
            raise BadRequest("node id must be 40 hex digits") from exc
        if request.method == "DELETE":
            actor = require_admin(request, self.config.admin_token)
            cleared = await self.swarm.clear_peer(node)
            await self.operations.record(request, "peer-cleared", actor, text, cleared=cleared)
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
