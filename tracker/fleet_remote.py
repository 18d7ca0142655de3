"""What the shared fleet stores (Redis, PostgreSQL) have in common: write-behind, and views.

Recording must not slow the announce path (:mod:`tracker.fleet_store`), so a shared store
merges sightings into a dict of pending seats on the trio thread (:meth:`WriteBehind.seen`),
and :meth:`WriteBehind.run` writes them every ``FLUSH_S`` in one batch from a worker thread
(bounded by ``MAX_PENDING``: past it, sightings are dropped and counted, since a node
re-announces soon). A view first writes what this replica was told, so it reads its own
sightings. The stores differ in how they write and read; the views' shapes are built here from
what they read, so both answer exactly as :class:`tracker.fleet.MemoryFleet` does.

A pending seat is ``[M, INFO, SEEN, CLIENT, OUTCOME]``: ``M`` the first 16 hex digits of the
manifest the node runs (empty: not known from this sighting), ``INFO`` ``manifest id|build``,
``SEEN`` Unix seconds, ``CLIENT`` its version (empty: not said), ``OUTCOME`` its last one as
``kind,code,to,at`` (empty: none).
"""

from __future__ import annotations

import json
from typing import Any

import trio

from .errors import Unavailable
from .fleet import FleetOutcome, Sighting

__all__ = ["FLUSH_S", "MAX_PENDING", "RECENT_OUTCOMES", "WriteBehind", "app_view_of", "seat_of"]

FLUSH_S = 0.5
MAX_PENDING = 200_000
#: Outcomes kept whole for the node view (fewer than in memory: a node view reads them all).
RECENT_OUTCOMES = 2000

Batch = tuple[dict[tuple[bytes, str], list[str]], list[str]]


class WriteBehind:
    """Pending seats and outcomes, written behind by :meth:`run` (see the module docstring).
    Subclasses write (:meth:`write`), translate their errors (:meth:`_call`) and read
    (``_app_view``, ``_node_view``, ``_gauges``, ``_gc``)."""

    def __init__(self) -> None:
        #: (node, app) -> [m16, info, seen, client, outcome], merged until the next flush
        self._pending: dict[tuple[bytes, str], list[str]] = {}
        self._recent: list[str] = []
        self.dropped = 0

    # ------------------------------------------------------------------ recording

    def seen(self, s: Sighting, outcome: str = "") -> None:
        key = (s.node, s.app)
        p = self._pending.get(key)
        if p is None:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            p = self._pending[key] = ["", "", "", "", ""]
        if s.manifest is not None and s.build is not None:
            p[0], p[1] = s.manifest.hex()[:16], f"{s.manifest.hex()}|{s.build}"
        p[2] = str(int(s.now))
        if s.client is not None:
            p[3] = s.client
        if outcome:
            p[4] = outcome

    def outcome(self, o: FleetOutcome) -> None:
        ok = o.code is None
        self.seen(
            Sighting(
                o.node, o.app, o.manifest if ok else None, o.to_build if ok else None, None, o.now
            ),
            f"{o.kind},{o.code or ''},{o.to_build},{int(o.now)}",
        )
        if len(self._recent) < RECENT_OUTCOMES:
            self._recent.append(json.dumps({"node_id": o.node.hex(), **o.to_json()}))

    def take(self) -> Batch:
        """What is pending, to :meth:`write` (taken on the trio thread, where ``seen`` runs)."""
        batch = self._pending, self._recent
        self._pending, self._recent = {}, []
        return batch

    def write(self, batch: Batch) -> int:
        """Write taken seats (blocking: from a worker thread); how many."""
        raise NotImplementedError

    async def _call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, its store's errors as :class:`Unavailable`."""
        raise NotImplementedError

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(FLUSH_S)
            try:
                await self._call(self.write, self.take())
            except Unavailable:
                pass  # these sightings are lost; nodes announce again within an interval

    # ------------------------------------------------------------------ views

    def _gc(self, now: float) -> int:
        raise NotImplementedError

    def _app_view(self, app: str, now: float) -> dict[str, Any] | None:
        raise NotImplementedError

    def _node_view(self, node: bytes) -> dict[str, Any] | None:
        raise NotImplementedError

    def _gauges(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _read(self, fn: Any, *args: Any) -> Any:
        """``fn`` after writing what this replica was told: it reads its own sightings."""
        batch = self.take()

        def both() -> Any:
            self.write(batch)
            return fn(*args)

        return await self._call(both)

    async def gc(self, now: float) -> int:
        return int(await self._read(self._gc, now))

    async def app_view(self, app: str, now: float) -> dict[str, Any] | None:
        res: dict[str, Any] | None = await self._read(self._app_view, app, now)
        return res

    async def node_view(self, node: bytes) -> dict[str, Any] | None:
        res: dict[str, Any] | None = await self._read(self._node_view, node)
        return res

    async def gauges(self) -> dict[str, Any]:
        res: dict[str, Any] = await self._read(self._gauges)
        return res


def app_view_of(
    app: str,
    now: float,
    counts: dict[str, int],
    info: dict[str, str],
    seen: dict[str, float],
    series: list[tuple[int, dict[str, int]]],
    clients: dict[str, int],
    ttl: float,
    bucket: int,
    joined: int = 0,
) -> dict[str, Any]:
    """``MemoryFleet.app_view``'s answer from what a store read: seats per ``M`` (``-``:
    updating), ``M`` -> ``manifest id|build`` and last seen, the sampled curves by time (with
    the joins so far as ``+``), seats per client version, and the joins so far."""
    counts = dict(counts)
    updating = counts.pop("-", 0)
    total = updating + sum(counts.values())
    builds: list[dict[str, Any]] = []
    for m, text in info.items():
        curve = [[at, pts.get(m, 0)] for at, pts in series if m in pts]
        n = counts.get(m, 0)
        curve.append([int(now), n])
        if not n and len(curve) == 1:
            continue
        manifest, build = text.split("|")
        builds.append(
            {
                "manifest_id": manifest,
                "build": int(build),
                "nodes": n,
                "share": n / total if total else 0.0,
                "last_seen": seen.get(m, 0.0),
                "adoption": curve,
            }
        )
    builds.sort(key=lambda b: -int(b["build"]))
    return {
        "app": app,
        "nodes": total,
        "updating": updating,
        "ttl_s": ttl,
        "bucket_s": bucket,
        "builds": builds,
        "clients": dict(sorted(clients.items(), key=lambda kv: -kv[1])),
        "joined": [*([at, pts["+"]] for at, pts in series if "+" in pts), [int(now), joined]],
    }


def seat_of(
    app: str, seen: int, client: str, out: str, info: str | None, ttl: float
) -> dict[str, Any]:
    """One app of ``MemoryFleet.node_view``'s answer from a stored seat (``info``: its
    build's ``manifest id|build``, ``None`` while it is updating)."""
    manifest, build = info.split("|") if info else (None, None)
    last = None
    if out:
        kind, code, to, at = out.split(",")
        last = {
            "kind": kind,
            "outcome": "failure" if code else "success",
            "code": code or None,
            "to_build": int(to),
            "at": int(at),
        }
    return {
        "app": app,
        "manifest_id": manifest,
        "build": int(build) if build is not None else None,
        "client": client,
        "last_seen": seen,
        "expires": seen + ttl,
        "last_outcome": last,
    }
