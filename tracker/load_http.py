"""Bandwidth and load on the app: the traffic series' feed and routes, and the forecast made at
each event that starts nodes fetching a build: its publish, a promote (another channel's
fleet), a raise or completion of its staged rollout (more of the channel let in).

What feeds it: every accepted announce (an online-hour count), every accepted outcome (its
reused and patch bytes, the patches split by source), and once a minute the swarm's
per-release counters (housekeeping, :meth:`LoadRoutes.tick`, which also writes the gathered
batch every 10 s). See
:mod:`tracker.traffic` for the series and :mod:`tracker.forecast` for the model.

Routes (open, like ``/v1/stats``, but the dry run, which takes a manifest upload):

* ``GET /v1/apps/{app}/builds/{build}/traffic``: the build's bytes by source per minute.
* ``GET /v1/apps/{app}/builds/{build}/forecast``: the forecasts recorded at the build's events,
  each beside what followed it until the next (actual CDN egress per minute beside the
  predicted); ``forecast``/``actual`` are the first event's (its publish).
* ``POST /v1/apps/{app}/channels/{channel}/forecast``: the forecast of publishing that signed
  manifest now, recorded nowhere (publisher or admin token).
* ``GET /v1/apps/{app}/load``: the release hour and the app's recent forecasts against what
  followed (the dashboard's load section).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2pnode.release.manifest import Manifest, parse_signed

from . import core
from .auth import require_publisher
from .backend import RegistryStore, SwarmStore
from .channels import checked_upload
from .errors import BadRequest, NotFound, Unavailable
from .fleet_store import FleetStore
from .forecast import (
    HISTORY,
    HORIZON_MIN,
    PastRelease,
    bytes_needed,
    compare,
    join_rate,
    mirror_split,
    predict,
)
from .keyrotation import app_keys
from .operations import PERCENT_RANGE
from .outcomes import MAX_BUILD, Outcome
from .traffic import (
    ADD_NAMES,
    LEVEL_NAMES,
    RETENTION_S,
    MinuteRow,
    TrafficRecorder,
    per_minute,
    profile,
    release_hour,
)
from .traffic_store import TrafficStore
from .web import query_float

__all__ = ["LoadRoutes"]

log = logging.getLogger(__name__)

BUILD_PATTERN = r"^[0-9]{1,19}$"
_BUILD = re.compile(BUILD_PATTERN)
#: Seconds between writes of the gathered batch, and between trims of the store.
FLUSH_S = 10
GC_S = 3600
#: Base builds of the fleet whose manifests are read for the need (the rest need it all).
BASES = 10
#: Recent forecasts (events) the load view shows per app, from how many history entries of
#: each channel.
LOAD_FORECASTS = 8
LOAD_HISTORY = 10
#: Channel moves a forecast is made at (the publish's is made by the publish route); they
#: are the history's action names.
MOVES = ("promote", "rollout-raise", "rollout-complete")

Call = Callable[..., Awaitable[Any]]


class LoadRoutes:
    """The traffic recorder and store, the forecasts at a build's events, and their routes."""

    def __init__(
        self,
        store: TrafficStore,
        registry: RegistryStore,
        swarm: SwarmStore,
        fleet: Callable[[], FleetStore],
        admin_token: str,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.recorder = TrafficRecorder()
        self._registry = registry
        self._swarm = swarm
        self._fleet = fleet
        self._admin = admin_token
        self._clock = clock
        self._flushed = self._trimmed = 0.0

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if getattr(fn.__self__, "blocking", False):  # type: ignore[attr-defined]
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    # ---------------------------------------------------------------- feed

    def announced(self, app: str, now: float) -> None:
        self.recorder.announced(app, now)

    def reported(self, o: Outcome, now: float) -> None:
        self.recorder.outcome(o.app, o.manifest, o.bytes_by_source(), now)

    async def tick(self, now: float, *, force: bool = False) -> None:
        """Housekeeping: sample the swarm's counters once a minute, write what was gathered
        every ``FLUSH_S`` (``force``: now), trim the store every ``GC_S``. A write that fails
        keeps the batch for the next try."""
        if self.recorder.due(now):
            stats = await self._swarm.stats(now)
            self.recorder.sample(stats["releases"], now)
        if force or now - self._flushed >= FLUSH_S:
            self._flushed = now
            for _ in range(2):  # a batch that failed before (whole, with its id), then the new
                retried = self.recorder.retrying
                batch = self.recorder.take()
                if batch:
                    try:
                        await self._call(self.store.write, batch)
                    except BaseException:  # kept for the next try (cancelled included)
                        self.recorder.restore(batch)
                        raise
                if not retried:
                    break
        if now - self._trimmed >= GC_S:
            self._trimmed = now
            await self._profile(now)
            await self._call(self.store.gc, now)

    async def _profile(self, now: float) -> None:
        """Keep the first day after each event over a day ago (and still within the series'
        retention) with its forecast, so later forecasts can read it after its minutes are
        gone."""
        recorded = await self._call(self.store.forecasts_since, now - RETENTION_S)
        for mid, app, f in recorded:
            if "profile" in f or now - f["at"] < 60 * (HORIZON_MIN + 1):
                continue
            start = int(f["at"]) // 60 * 60  # (before it: another event's, or another fleet's)
            rows = [r for r in await self._series(mid) if r["t"] >= start]
            f["profile"] = profile(rows, f["at"], HORIZON_MIN)
            await self._call(self.store.put_forecast, mid, app, f)

    def close(self) -> None:
        """Write what is still gathered (a clean stop loses nothing), then close the store."""
        try:
            for _ in range(2):  # a batch that failed before, then the new
                batch = self.recorder.take()
                if batch:
                    self.store.write(batch)
        except Unavailable as exc:
            log.warning("traffic of the last seconds not written: %s", exc)
        self.store.close()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/apps/{app:str}/builds/{build:str}/traffic", self.traffic),
            Route("/v1/apps/{app:str}/builds/{build:str}/forecast", self.forecast),
            Route(
                "/v1/apps/{app:str}/channels/{channel:str}/forecast",
                self.dry_run,
                methods=["POST"],
            ),
            Route("/v1/apps/{app:str}/load", self.load),
        ]

    # ---------------------------------------------------------------- the model's inputs

    async def _manifest(self, mid: bytes) -> Manifest | None:
        raw = await self._call(self._registry.get_manifest, mid)
        if raw is None:
            return None
        return (await trio.to_thread.run_sync(parse_signed, raw)).manifest

    async def _live(self, now: float) -> tuple[int, dict[bytes, dict[str, int]]]:
        """The swarm's counters now, per build: the current minute, not sampled yet."""
        stats = await self._swarm.stats(now)
        return int(now) // 60, {
            bytes.fromhex(r["manifest_id"]): {
                "completed": int(r["completed"]),
                "peers": int(r["bytes_from_peers"]),
                "cdn": int(r["bytes_from_cdn"]),
            }
            for r in stats["releases"]
        }

    async def _series(
        self, mid: bytes, live: tuple[int, dict[bytes, dict[str, int]]] | None = None
    ) -> list[dict[str, int]]:
        """The build's rows (``per_minute``), ending with ``live``'s minute when its counters
        moved since the last sample (so an answer is never a minute behind)."""
        first, rows = await self._call(self.store.series, mid)
        for minute, adds in self.recorder.pending_adds(mid).items():
            at = next((i for i, r in enumerate(rows) if r.minute == minute), None)
            if at is None:
                rows.append(MinuteRow(minute, {}, adds))
                first = minute if first is None else min(first, minute)
            else:
                mine = rows[at].adds
                rows[at] = MinuteRow(
                    minute,
                    rows[at].levels,
                    {k: mine.get(k, 0) + adds.get(k, 0) for k in {*mine, *adds}},
                )
        rows.sort(key=lambda r: r.minute)
        levels = live[1].get(mid) if live else None
        if live and levels and first is not None:  # (None: never sampled, or past retention)
            minute = live[0]
            last = next((r.levels for r in reversed(rows) if r.levels), None)
            if rows and rows[-1].minute >= minute:
                if levels != last:
                    rows[-1] = MinuteRow(rows[-1].minute, levels, rows[-1].adds)
            elif levels != last:
                rows.append(MinuteRow(minute, levels, {}))
        return per_minute(rows, first)

    async def _past(
        self, history: list[dict[str, Any]], mid: bytes, channel: str, now: float
    ) -> list[PastRelease]:
        """The channel's recent releases (publishes and promotes of other builds), each with
        its series since then (a promoted build's earlier minutes were another fleet's)."""
        live = await self._live(now)
        past: list[PastRelease] = []
        seen: set[str] = set()
        for h in history:  # newest first
            if (
                h["action"] not in ("publish", "promote")
                or h["manifest_id"] in seen
                or h["manifest_id"] == mid.hex()
            ):
                continue
            seen.add(h["manifest_id"])
            rows = await self._series(bytes.fromhex(h["manifest_id"]), live)
            if rows and rows[0]["t"] - h["at"] > RETENTION_S:
                rows = []  # a series begun after the first was gone: its start is not its start
            if not rows:  # its minutes are gone: the profile kept with its forecast
                kept = await self._call(self.store.forecasts, bytes.fromhex(h["manifest_id"]))
                near = [
                    f for f in kept
                    if f.get("channel") == channel and abs(f["at"] - h["at"]) < 60
                ]  # fmt: skip
                rows = near[0].get("profile", []) if near else []
            start = int(h["at"]) // 60 * 60
            rows = [r for r in rows if h["action"] == "publish" or r["t"] >= start]
            if rows:
                past.append(PastRelease(h["build"], h["at"], rows))
            if len(past) >= 2 * HISTORY:
                break
        return past

    async def make_forecast(
        self,
        m: Manifest,
        mid: bytes,
        channel: str,
        percent: float,
        now: float,
        *,
        event: str = "publish",
        was_percent: float = 0.0,
    ) -> dict[str, Any]:
        """The forecast of ``event`` (a publish, promote or rollout raise to ``percent``
        from ``was_percent``) of ``m`` (id ``mid``) on ``channel`` at ``now``."""
        history = await self._call(self._registry.history, m.app, channel, 100)
        carried = {h["manifest_id"] for h in history} - {mid.hex()}
        view = await self._fleet().app_view(m.app, now) or {"builds": []}
        on_channel = [b for b in view["builds"] if b["manifest_id"] in carried and b["nodes"]]
        on_channel.sort(key=lambda b: -b["nodes"])
        on_build = sum(b["nodes"] for b in view["builds"] if b["manifest_id"] == mid.hex())
        fleet: list[tuple[Manifest | None, int]] = []
        for i, b in enumerate(on_channel):
            base = await self._manifest(bytes.fromhex(b["manifest_id"])) if i < BASES else None
            fleet.append((base, b["nodes"]))
        need = await trio.to_thread.run_sync(bytes_needed, m, fleet)
        past = await self._past(history, mid, channel, now)
        others = sum(n for _, n in fleet)
        # a raise lets in a share of the whole channel, the nodes already on the build too
        nodes = others + (on_build if event.startswith("rollout") else 0)
        everyone = view.get("nodes", 0)  # (the channel's share of the app's joiners)
        joining = join_rate(view.get("joined", []), now) * (nodes / everyone if everyone else 0)
        mirrors: list[str | None] = list(m.mirrors) or [None]
        split, whole = mirror_split(need, len(mirrors))
        model = functools.partial(  # a day of minutes per mirror: tens of ms, off the loop
            predict,
            nodes=nodes, need=need["need"], size=need["size"], history=past, published=now,
            percent=percent, patch_need=need["patch_need"], was_percent=was_percent,
            joiners_per_min=joining, mirrors=mirrors, split=split, whole_split=whole,
        )  # fmt: skip
        f = await trio.to_thread.run_sync(model)
        f.update(app=m.app, channel=channel, build=m.build, manifest_id=mid.hex(), event=event)
        f["need_by_build"] = need["per_build"]
        return f

    async def recorded(
        self,
        app: str,
        channel: str,
        mid: bytes,
        event: str,
        now: float,
        *,
        percent: float = 100.0,
        was_percent: float = 0.0,
        m: Manifest | None = None,
    ) -> dict[str, Any] | None:
        """Record the forecast of an event that just happened (see :meth:`make_forecast`);
        its summary (``None`` if it could not be made: the event stands regardless)."""
        try:
            if m is None:
                m = await self._manifest(mid)
            if m is None or m.app != app:
                return None
            f = await self.make_forecast(
                m, mid, channel, percent, now, event=event, was_percent=was_percent
            )
            await self._call(self.store.put_forecast, mid, m.app, f)
        except Exception:  # a forecast that failed must not fail the event it follows
            log.exception("no forecast for the %s of %s on %s/%s", event, mid.hex(), app, channel)
            return None
        return summary(f)

    async def published(
        self, m: Manifest, mid: bytes, channel: str, percent: float | None, now: float
    ) -> dict[str, Any] | None:
        """Record the forecast of a publish that just happened; its summary for the publish
        answer (``None`` if it could not be made: the publish stands regardless)."""
        return await self.recorded(
            m.app, channel, mid, "publish", now,
            percent=100.0 if percent is None else percent, m=m,
        )  # fmt: skip

    async def moved(
        self, app: str, channel: str, mid: bytes, action: str, was: float, percent: float
    ) -> None:
        """A channel move (``MOVES``: a promote, or a rollout raised from ``was`` to
        ``percent`` percent): record its forecast, unless it lets no node in."""
        if action in MOVES and (action == "promote" or percent > was):
            await self.recorded(
                app, channel, mid, action, self._clock(), percent=percent,
                was_percent=0.0 if action == "promote" else was,
            )  # fmt: skip

    # ---------------------------------------------------------------- routes

    async def _build(self, request: Request) -> tuple[str, int, bytes]:
        """(app, build, manifest id) named by the path (``?manifest=`` when two channels hold
        the build number as different manifests)."""
        app = core.check_name(request.path_params["app"], "app")
        text = request.path_params["build"]
        if not _BUILD.match(text) or int(text) > MAX_BUILD:
            raise BadRequest(f"build must be a number from 0 to {MAX_BUILD}")
        build = int(text)
        want = request.query_params.get("manifest")
        if want is not None and not re.fullmatch(core.HEX64_PATTERN[1:-1], want):
            raise BadRequest("manifest must be 64 hex digits")
        releases = await self._call(self._registry.releases)
        mids = sorted(mid for mid, (a, b, _) in releases.items() if a == app and b == build)
        if want is not None:
            mids = [m for m in mids if m.hex() == want]
        if not mids:
            raise NotFound(f"build {build} of {app} is not published here", fix="check the build")
        return app, build, mids[-1]

    async def traffic(self, request: Request) -> Response:
        app, build, mid = await self._build(request)
        rows = await self._series(mid, await self._live(self._clock()))
        totals = {k: sum(r[k] for r in rows) for k in (*LEVEL_NAMES, *ADD_NAMES)}
        moved = totals["peers"] + totals["cdn"]
        return JSONResponse(
            {
                "app": app,
                "build": build,
                "manifest_id": mid.hex(),
                "minute_s": 60,
                "retention_s": RETENTION_S,
                "totals": totals,
                "offload_ratio": totals["peers"] / moved if moved else None,
                "series": rows,
            }
        )

    async def _reports(
        self, mid: bytes, now: float, live: tuple[int, dict[bytes, dict[str, int]]]
    ) -> list[dict[str, Any]]:
        """The build's forecasts, each beside what followed until the build's next event."""
        events = await self._call(self.store.forecasts, mid)
        if not events:
            return []
        rows = await self._series(mid, live)
        out = []
        for i, f in enumerate(events):
            f.pop("profile", None)
            until = events[i + 1]["at"] if i + 1 < len(events) else None
            out.append({"forecast": f, "actual": compare(f, rows, now, until)})
        return out

    async def forecast(self, request: Request) -> Response:
        app, build, mid = await self._build(request)
        now = self._clock()
        reports = await self._reports(mid, now, await self._live(now))
        if not reports:
            raise NotFound(
                f"no forecast was recorded for build {build} of {app}",
                fix="forecasts are made when a build is published or promoted, or its rollout "
                "raised (kept 90 days)",
            )
        return JSONResponse({**reports[0], "events": reports})

    async def dry_run(self, request: Request) -> Response:
        app = core.check_name(request.path_params["app"], "app")
        channel = core.check_name(request.path_params["channel"], "channel")
        row = self._registry.get_app(app)
        if row is None:
            raise NotFound(f"app {app} is not registered", fix="register it: tracker app add")
        require_publisher(request, self._admin, app, row)
        percent = (
            query_float(request, "rollout", *PERCENT_RANGE)
            if "rollout" in request.query_params
            else 100.0
        )
        now = self._clock()
        ring = await app_keys(self._registry, self._call, row)
        _, signed = await checked_upload(request, ring, now)
        if signed.manifest.app != app:
            raise BadRequest(f"the manifest is for app {signed.manifest.app}, not {app}")
        f = await self.make_forecast(signed.manifest, signed.id, channel, percent, now)
        return JSONResponse(f)

    async def load(self, request: Request) -> Response:
        app = core.check_name(request.path_params["app"], "app")
        if self._registry.get_app(app) is None:
            raise NotFound(f"app {app} is not registered", fix="register it: tracker app add")
        now = self._clock()
        cells = await self._call(self.store.online_cells, app, now)
        heads = await self._call(self._registry.channels, app)
        mids: list[str] = []
        for head in heads:
            for h in await self._call(self._registry.history, app, head.channel, LOAD_HISTORY):
                if h["action"] in ("publish", *MOVES) and h["manifest_id"] not in mids:
                    mids.append(h["manifest_id"])
        live = await self._live(now)
        reports = [r for mid in mids for r in await self._reports(bytes.fromhex(mid), now, live)]
        reports.sort(key=lambda r: -r["forecast"]["at"])
        builds = [
            {**summary(r["forecast"]), "predicted": r["forecast"]["curve"], "actual": r["actual"]}
            for r in reports[:LOAD_FORECASTS]
        ]
        return JSONResponse({"app": app, "release_hour": release_hour(cells), "forecasts": builds})


def summary(f: dict[str, Any]) -> dict[str, Any]:
    """A forecast without its per-minute curve."""
    return {k: v for k, v in f.items() if k not in ("curve", "need_by_build", "profile")}
