"""Bytes by source per release, per minute, and when the fleet is online. No I/O here.

Theory of operation
-------------------
Nodes already say where their bytes came from: every announce carries the node's running
``from_peers`` / ``from_cdn`` for the build, which the swarm store sums per release (its
``/v1/stats`` counters, with the completions), and every install outcome carries its bytes by
source (peers, CDN, reused, patches). This module turns both into a time series per release,
one row per minute, without touching the announce path's stores:

* **Levels**: once a minute the tracker reads the swarm's per-release counters (``completed``,
  ``peers``, ``cdn``: running totals) and :meth:`TrafficRecorder.sample` writes those that moved,
  as the level at the end of the minute that just ended. The store keeps the highest level written
  for a minute, so replicas reading the same shared counters (Redis script or log mode) write the
  same value and nothing is counted twice. A minute's bytes are the difference from the previous
  stored minute (:func:`per_minute`); a level that fell (the disposable swarm state was lost)
  starts again from zero.
* **Adds**: ``reused`` and ``patches`` exist only in outcomes; each accepted outcome is taken
  by exactly one replica, which adds its bytes to the minute it arrived in. Patch bytes are
  also split by source (``patches_cdn``, ``patches_peers``): nodes count a patch in the
  ``from_cdn`` or ``from_peers`` they announce, so the ``cdn`` level is the CDN's whole egress
  (chunks and patches) and these say how much of it was patches. Nodes older than the split
  report patches without it: ``patches`` minus both parts is what no node split.
* **Online hours**: every accepted announce adds one to its app's (UTC day, hour) cell. All
  nodes announce at the same interval, so a cell's count is proportional to the nodes online
  in that hour; :func:`release_hour` reads the last days' cells as an hour-of-day histogram.

The recorder gathers all of it in memory between flushes (:meth:`TrafficRecorder.take`, every
10 s from the tracker's housekeeping) and the store writes it in one transaction or script
(:mod:`tracker.traffic_store`). A crash loses at most those seconds of adds.

**Each batch is applied once.** Adds and online counts are sums, so a batch written twice would
count twice, and a write can fail after the store applied it: the reply is lost (the connection
drops after Redis ran the script or PostgreSQL committed; redis-py then sends the script again
by itself), and the tracker cannot tell that from a write that never arrived. So every batch
carries a random id, and each store records the ids it applied in the same script or
transaction as the batch (kept ``RETENTION_S``), skipping a batch whose id it already holds. A
batch whose write failed is retried whole, with its id (:meth:`TrafficRecorder.restore`), never
merged into newer adds.

Bounded: rows older than ``RETENTION_S`` (7 days of minutes) are deleted, at most
``MAX_BUILDS`` builds keep a series (the one written longest ago goes first), online cells are
kept ``RETENTION_S`` too (24 per app per day), forecasts ``FORECAST_RETENTION_S`` (with their
build's first day, :func:`profile`), and the recorder's pending batch holds at most one entry
per (build, minute) and per (app, hour).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADD_NAMES",
    "FORECAST_RETENTION_S",
    "LEVEL_NAMES",
    "MAX_BUILDS",
    "RETENTION_S",
    "MinuteRow",
    "TrafficBatch",
    "TrafficRecorder",
    "per_minute",
    "profile",
    "release_hour",
]

#: How long a minute's row, an online cell and a recorded forecast are kept (seconds).
RETENTION_S = 7 * 24 * 3600
RETENTION_MINUTES = RETENTION_S // 60
RETENTION_DAYS = RETENTION_S // 86400
#: How long a recorded forecast is kept, with its build's *profile*: the first day of its
#: series, which is all the forecast of a later publish reads of it (:func:`profile`), so a
#: build's history outlives its minutes.
FORECAST_RETENTION_S = 90 * 24 * 3600
#: Builds that keep a series at most (forecasts: ``tracker.forecast.MAX_FORECASTS``).
MAX_BUILDS = 2000
#: A level read this many seconds or more into a minute is that minute's, not the one
#: before's (:meth:`TrafficRecorder.sample`): housekeeping reads every 10 s, so on time it
#: reads well before.
LATE_READ_S = 20
#: Running totals sampled from the swarm's counters (the store keeps a minute's highest).
LEVEL_NAMES = ("completed", "peers", "cdn")
#: Sums added by accepted outcomes (``outcomes.SOURCES`` the announces do not carry): the
#: reused bytes, the delta patch bytes, and how many of those came from the CDN and from peers
#: (already in the ``cdn`` and ``peers`` levels, which count patches with chunks).
ADD_NAMES = ("reused", "patches", "patches_cdn", "patches_peers")
#: The recorder forgets the last level written of this many builds at most (a bound: a
#: forgotten build's next sample is written again, which the max keeps harmless).
_LAST_LEVELS = 10_000
#: The release hour is the start of the busiest window of this many hours.
WINDOW_HOURS = 3


@dataclass
class TrafficBatch:
    """What one replica gathered since its last flush."""

    #: the stores apply a batch id once (a retried write whose first try was applied is
    #: skipped: see the module docstring)
    id: bytes = field(default_factory=lambda: os.urandom(16))
    #: the latest time anything was gathered (Unix s): the stores keep the id ``RETENTION_S``
    #: from then
    at: float = 0.0
    #: (manifest, minute) -> (app, {level name: running total})
    levels: dict[tuple[bytes, int], tuple[str, dict[str, int]]] = field(default_factory=dict)
    #: (manifest, minute) -> (app, {add name: bytes})
    adds: dict[tuple[bytes, int], tuple[str, dict[str, int]]] = field(default_factory=dict)
    #: (app, UTC day number, hour) -> announces
    online: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.levels or self.adds or self.online)


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One stored minute of one build: its levels (if sampled then) and adds."""

    minute: int
    levels: dict[str, int]
    adds: dict[str, int]


class TrafficRecorder:
    """Gathers levels, adds and online counts between flushes (see the module docstring)."""

    def __init__(self) -> None:
        self._batch = TrafficBatch()
        #: a batch whose write failed: written again as it is before anything newer
        self._unsent: TrafficBatch | None = None
        self._last: dict[bytes, tuple[int, ...]] = {}
        self._sampled = -1

    def announced(self, app: str, now: float) -> None:
        t = int(now)
        key = (app, t // 86400, t % 86400 // 3600)
        self._batch.online[key] = self._batch.online.get(key, 0) + 1
        self._batch.at = max(self._batch.at, now)

    def outcome(self, app: str, manifest: bytes, adds: Mapping[str, int], now: float) -> None:
        """An accepted outcome's bytes (``ADD_NAMES``; others are ignored)."""
        if not any(adds.get(name) for name in ADD_NAMES):
            return
        key = (manifest, int(now) // 60)
        self._batch.at = max(self._batch.at, now)
        _, counts = self._batch.adds.setdefault(key, (app, {}))
        for name in ADD_NAMES:
            if n := adds.get(name, 0):
                counts[name] = counts.get(name, 0) + n

    def due(self, now: float) -> bool:
        """Whether a new minute started since the last :meth:`sample`."""
        return int(now) // 60 != self._sampled

    def sample(self, releases: Iterable[dict[str, Any]], now: float) -> int:
        """Levels of the releases whose counters moved since this recorder last wrote them
        (``releases``: ``/v1/stats`` rows); how many. A level read in a minute's first
        seconds (housekeeping runs every 10 s) is what nodes announced until then, so it is
        written as the level at the end of the minute before. One read later in the minute (a
        housekeeping pass held up by a slow store or a busy process) also holds what was
        announced in this minute, so it is written as this minute's: written as the minute
        before's, a build's first bytes were dated before its publish, and the forecast's
        comparison, which starts at the publish's minute, missed them."""
        self._sampled = int(now) // 60
        self._batch.at = max(self._batch.at, now)
        minute = self._sampled - (1 if now % 60 < LATE_READ_S else 0)
        n = 0
        for r in releases:
            mid = bytes.fromhex(r["manifest_id"])
            level = (int(r["completed"]), int(r["bytes_from_peers"]), int(r["bytes_from_cdn"]))
            if self._last.get(mid) == level:
                continue
            if len(self._last) >= _LAST_LEVELS:
                self._last.clear()
            self._last[mid] = level
            self._batch.levels[(mid, minute)] = (
                r["app"],
                dict(zip(LEVEL_NAMES, level, strict=True)),
            )
            n += 1
        return n

    def pending_adds(self, manifest: bytes) -> dict[int, dict[str, int]]:
        """The build's adds not written yet, per minute (answers include them)."""
        out: dict[int, dict[str, int]] = {}
        for batch in (self._unsent, self._batch):
            for (mid, m), (_, counts) in batch.adds.items() if batch else ():
                if mid == manifest:
                    mine = out.setdefault(m, {})
                    for name, n in counts.items():
                        mine[name] = mine.get(name, 0) + n
        return out

    def take(self) -> TrafficBatch:
        """The batch to give the store: one whose write failed, again (same id and contents),
        else the pending batch (empty afterwards). Empty when there is nothing to write."""
        if self._unsent is not None:
            batch, self._unsent = self._unsent, None
            return batch
        batch, self._batch = self._batch, TrafficBatch()
        return batch

    def restore(self, batch: TrafficBatch) -> None:
        """Keep a batch the store could not write, to be taken again whole before anything
        newer: the write may have been applied (a lost reply), which only its id tells."""
        assert self._unsent is None, "one failed batch is retried at a time"
        self._unsent = batch

    @property
    def retrying(self) -> bool:
        """Whether the next :meth:`take` gives a batch whose write failed."""
        return self._unsent is not None


def per_minute(rows: Sequence[MinuteRow], first: int | None) -> list[dict[str, int]]:
    """Each stored minute's completions and bytes by source, from its levels' differences
    and its adds. ``first``: the build's first recorded minute; a series whose oldest rows were
    deleted (retention) uses its oldest remaining level as the base, not as traffic."""
    out = []
    ordered = sorted(rows, key=lambda r: r.minute)
    trimmed = bool(ordered) and first is not None and ordered[0].minute > first
    prev: dict[str, int] | None = None
    for row in ordered:
        item = {"t": row.minute * 60}
        if row.levels:
            for name in LEVEL_NAMES:
                v = row.levels.get(name, 0)
                base = (v if trimmed else 0) if prev is None else prev.get(name, 0)
                item[name] = v - base if v >= base else v  # fell: the swarm's state restarted
            prev = row.levels
        else:
            item.update(dict.fromkeys(LEVEL_NAMES, 0))
        for name in ADD_NAMES:
            item[name] = row.adds.get(name, 0)
        out.append(item)
    return out


def release_hour(
    cells: Iterable[tuple[int, int, int]], *, window: int = WINDOW_HOURS
) -> dict[str, Any]:
    """When to publish, from (day, hour, announces) cells: the hour-of-day histogram (UTC),
    the hour that starts the busiest ``window`` hours, and the quietest hour.

    Why the busiest window: most nodes take a build at their first check after the publish,
    so a build published as the fleet comes online is fetched while the most peers are there
    to serve it (the highest offload) and its failures show while the operator is watching
    (a staged rollout reaches its halt threshold soonest). The quietest hour is given for
    operators who would rather spread the load thin."""
    hist = [0] * 24
    days = set()
    for day, hour, n in cells:
        hist[hour % 24] += n
        days.add(day)
    total = sum(hist)
    if not total:
        return {
            "histogram": hist,
            "days": 0,
            "announces": 0,
            "recommended_hour": None,
            "quietest_hour": None,
            "window_hours": window,
        }
    windows = [sum(hist[(h + k) % 24] for k in range(window)) for h in range(24)]
    best = max(range(24), key=lambda h: (windows[h], hist[h], -h))
    quiet = min(range(24), key=lambda h: (hist[h], h))
    return {
        "histogram": hist,
        "days": len(days),
        "announces": total,
        "recommended_hour": best,
        "recommended_share": windows[best] / total,
        "quietest_hour": quiet,
        "window_hours": window,
    }


def profile(rows: Sequence[dict[str, int]], published: float, minutes: int) -> list[dict[str, int]]:
    """A build's series (:func:`per_minute` rows) reduced to what a forecast reads of it: the
    rows of its first ``minutes`` after ``published`` as they are, the rest summed into one."""
    end = int(published) // 60 * 60 + 60 * minutes
    out = [dict(r) for r in rows if r["t"] < end]
    later = [r for r in rows if r["t"] >= end]
    if later:
        out.append({"t": end, **{k: sum(r[k] for r in later) for k in (*LEVEL_NAMES, *ADD_NAMES)}})
    return out
