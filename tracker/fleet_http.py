"""The fleet view's side of the app: what announces and outcomes feed it, its two routes, and
its Prometheus gauges.

``GET /v1/apps/{app}/fleet``: per build, the nodes that run it, their share, when one was
last seen, and its adoption curve; the nodes' client versions. ``GET /v1/nodes/{node_id}``:
what one node runs in each app and its recent outcomes. Both are open, like ``/v1/stats``
(they show what announces already show to everyone who asks the swarm).

Gauges are labelled by app and build (or client version), never by node: their number is
bounded by the fleet's tables (:mod:`tracker.fleet`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import core
from .backend import RegistryStore
from .errors import BadRequest, NotFound
from .fleet import FleetOutcome, Sighting
from .fleet_store import FleetStore
from .outcomes import Outcome

__all__ = ["FleetCollector", "FleetRoutes"]

_NODE_ID = re.compile(r"^[0-9a-fA-F]{40}$")
#: Manifests whose build number is remembered (a manifest's build never changes).
_BUILDS_CACHED = 10_000


class FleetRoutes:
    """Feeds the fleet store from the node routes and answers its routes."""

    def __init__(
        self, store: FleetStore, registry: RegistryStore, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self._clock = clock
        self._registry = registry
        self._builds: dict[bytes, int] = {}
        #: the last gauges read (``refresh``), for the collector
        self.gauges: dict[str, Any] = {"builds": [], "clients": [], "updating": []}

    def _build_of(self, manifest: bytes) -> int | None:
        b = self._builds.get(manifest)
        if b is None:
            info = self._registry.manifest_info(manifest)
            if info is None:
                return None
            if len(self._builds) >= _BUILDS_CACHED:
                self._builds.clear()
            b = self._builds[manifest] = info[1]
        return b

    def announced(self, a: core.Announce, now: float) -> None:
        """A verified, accepted announce: the node runs the build once it holds all of it."""
        done = (a.left == 0 and a.size > 0) or a.event == "completed"
        build = self._build_of(a.manifest) if done else None
        self.store.seen(
            Sighting(
                a.node_id, a.app, a.manifest if build is not None else None, build, a.client, now
            )
        )

    def reported(self, o: Outcome, now: float) -> None:
        self.store.outcome(
            FleetOutcome(
                o.node_id, o.app, o.manifest, o.kind, o.code, o.from_build, o.to_build, now
            )
        )

    async def refresh(self) -> None:
        self.gauges = await self.store.gauges()

    async def app_fleet(self, request: Request) -> Response:
        app = core.check_name(request.path_params["app"], "app")
        view = await self.store.app_view(app, self._clock())
        if view is None:
            if self._registry.get_app(app) is None:
                raise NotFound(f"app {app} is not registered", fix="check the app's name")
            # registered, no node seen yet: an empty fleet, not "not found"
            view = {"app": app, "nodes": 0, "updating": 0, "builds": [], "clients": {}}
        for b in view["builds"]:  # the registry names the version a node would show
            info = self._registry.manifest_info(bytes.fromhex(b["manifest_id"]))
            b["version"] = info[2] if info else None
        return JSONResponse(view)

    async def node(self, request: Request) -> Response:
        text = request.path_params["node_id"]
        if not _NODE_ID.match(text):  # fromhex alone would take spaces
            raise BadRequest("node id must be 40 hex digits")
        node = bytes.fromhex(text)
        view = await self.store.node_view(node)
        if view is None:
            raise NotFound(f"node {node.hex()} was not seen lately", fix="check the node id")
        return JSONResponse(view)


class FleetCollector:
    """Prometheus view of the fleet, from :attr:`FleetRoutes.gauges`."""

    def __init__(self, routes: FleetRoutes) -> None:
        self.routes = routes

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        g = self.routes.gauges
        builds = GaugeMetricFamily(
            "tracker_fleet_nodes",
            "Nodes running each build, as announces and outcomes last said (expired ones left out)",
            labels=["app", "build", "manifest"],
        )
        for app, manifest, build, n in g["builds"]:
            builds.add_metric([app, str(build), manifest], n)
        updating = GaugeMetricFamily(
            "tracker_fleet_updating_nodes",
            "Nodes seen downloading whose running build is not known yet, per app",
            labels=["app"],
        )
        for app, n in g["updating"]:
            updating.add_metric([app], n)
        clients = GaugeMetricFamily(
            "tracker_fleet_client_nodes",
            "Nodes per p2pnode client version, per app ('unknown': too old to say)",
            labels=["app", "client"],
        )
        for app, client, n in g["clients"]:
            clients.add_metric([app, client], n)
        yield from (builds, updating, clients)
