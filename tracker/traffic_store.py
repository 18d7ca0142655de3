"""Where the traffic series lives: the store interface, and the embedded SQLite store.

Theory of operation
-------------------
The series (:mod:`tracker.traffic`), the online-hour cells and the forecasts recorded at
each event of a build (its publish, promotes and rollout raises: :mod:`tracker.forecast`,
keyed by manifest, channel and time, so a build has several) are kept beside the
operations store: ``DIR/traffic.db`` (SQLite, a file of its
own so that a minute's write never moves the registry's ``data_version``, which wakes every
long-poll), or with ``--registry URL`` that Redis (:mod:`tracker.traffic_redis`) or that
PostgreSQL database (:mod:`tracker.traffic_pg`). Replicas sharing ``DIR``, the Redis or the
database share one series: levels are written with "keep the highest", adds
and online counts are summed (see :mod:`tracker.traffic` for why that counts nothing twice).

The interface is synchronous, with ``blocking`` saying whether a call may wait on the network
(the app then runs it in a worker thread), as :class:`tracker.backend.OpsStore`'s. A
backend implements :class:`TrafficStore` and is picked in :func:`open_traffic`;
``tests/tracker/test_traffic.py`` runs the same checks on every store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .forecast import MAX_FORECASTS
from .registry_sqlite import SQLiteFile
from .traffic import (
    ADD_NAMES,
    FORECAST_RETENTION_S,
    LEVEL_NAMES,
    MAX_BUILDS,
    RETENTION_DAYS,
    RETENTION_MINUTES,
    RETENTION_S,
    MinuteRow,
    TrafficBatch,
)

__all__ = ["SQLiteTraffic", "TrafficStore", "minute_rows", "open_traffic"]


class TrafficStore(Protocol):
    """Per-minute bytes by source per build, online-hour cells, recorded forecasts."""

    #: calls may wait on the network: the app runs them in a worker thread
    blocking: bool

    def close(self) -> None: ...

    def write(self, batch: TrafficBatch) -> None:
        """Apply a recorder's batch whole: levels keep the highest value per minute, adds and
        online counts are summed; keeps at most ``MAX_BUILDS`` builds. A batch whose id was
        applied already (within ``RETENTION_S``) is skipped whole, atomically with applying
        it: writing a batch twice counts it once."""
        ...

    def gc(self, now: float) -> None:
        """Drop minutes and online cells older than ``RETENTION_S``, forecasts older than
        ``FORECAST_RETENTION_S``."""
        ...

    def series(self, manifest: bytes) -> tuple[int | None, list[MinuteRow]]:
        """The build's first minute ever written (``None``: no series) and its stored rows."""
        ...

    def online_cells(self, app: str, now: float) -> list[tuple[int, int, int]]:
        """The app's (UTC day number, hour, announces) cells of the last ``RETENTION_S``."""
        ...

    def put_forecast(self, manifest: bytes, app: str, body: dict[str, Any]) -> None:
        """Keep the forecast made at an event of ``manifest``, keyed by the build, its
        ``body["channel"]`` and ``body["at"]`` (replacing one with the same key); at most
        ``MAX_FORECASTS``, the oldest going first."""
        ...

    def forecasts(self, manifest: bytes) -> list[dict[str, Any]]:
        """The forecasts of the build's events, oldest first."""
        ...

    def forecasts_since(self, since: float) -> list[tuple[bytes, str, dict[str, Any]]]:
        """(manifest, app, forecast) of the events at or after ``since``, oldest first."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS traffic_builds (
    id INTEGER PRIMARY KEY, manifest BLOB NOT NULL UNIQUE, app TEXT NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS traffic_builds_by_last ON traffic_builds(last);
CREATE TABLE IF NOT EXISTS traffic (
    build INTEGER NOT NULL, minute INTEGER NOT NULL,
    completed INTEGER, peers INTEGER, cdn INTEGER,
    reused INTEGER NOT NULL DEFAULT 0, patches INTEGER NOT NULL DEFAULT 0,
    patches_cdn INTEGER NOT NULL DEFAULT 0, patches_peers INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (build, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS online (
    app TEXT NOT NULL, day INTEGER NOT NULL, hour INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (app, day, hour)
);
CREATE TABLE IF NOT EXISTS forecast_events (
    manifest BLOB NOT NULL, channel TEXT NOT NULL, at REAL NOT NULL, app TEXT NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (manifest, channel, at)
);
CREATE TABLE IF NOT EXISTS traffic_batches (id BLOB PRIMARY KEY, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS traffic_batches_by_at ON traffic_batches(at);
CREATE INDEX IF NOT EXISTS forecast_events_by_at ON forecast_events(at);
"""


def minute_rows(cells: Iterable[Sequence[Any]]) -> list[MinuteRow]:
    """Stored rows ``(minute, *LEVEL_NAMES, *ADD_NAMES)`` as :class:`MinuteRow` (levels are
    ``NULL`` in a minute that was not sampled)."""
    rows = []
    for minute, *values in cells:
        levels = dict(zip(LEVEL_NAMES, values[: len(LEVEL_NAMES)], strict=True))
        adds = dict(zip(ADD_NAMES, values[len(LEVEL_NAMES) :], strict=True))
        sampled = levels["completed"] is not None
        rows.append(
            MinuteRow(
                int(minute),
                {k: int(v) for k, v in levels.items()} if sampled else {},
                {k: int(v) for k, v in adds.items() if v},
            )
        )
    return rows


#: A level column keeps the highest value written (NULL: not sampled that minute).
_KEEP_HIGHEST = ", ".join(
    f"{c} = CASE WHEN {c} IS NULL OR excluded.{c} > {c} THEN excluded.{c} ELSE {c} END"
    for c in LEVEL_NAMES
)


class SQLiteTraffic(SQLiteFile):
    """A :class:`TrafficStore` in one SQLite file (``DIR/traffic.db``): one row per build and
    minute (about 60 bytes), builds numbered in ``traffic_builds``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)
        with self._tx() as c:  # a file from before the patches' split by source
            have = {row[1] for row in c.execute("PRAGMA table_info(traffic)")}
            for name in ADD_NAMES:
                if name not in have:
                    c.execute(f"ALTER TABLE traffic ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")
        with self._tx() as c:  # a file of one forecast per build: they are publish events
            if c.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forecasts'"
            ).fetchone():
                c.execute(
                    "INSERT OR IGNORE INTO forecast_events (manifest, channel, at, app, body) "
                    "SELECT manifest, COALESCE(json_extract(body, '$.channel'), ''), at, app, "
                    "body FROM forecasts"
                )
                c.execute("DROP TABLE forecasts")

    def write(self, batch: TrafficBatch) -> None:
        builds: dict[bytes, tuple[str, int, int]] = {}
        for (mid, minute), (app, _) in [*batch.levels.items(), *batch.adds.items()]:
            _, lo, hi = builds.get(mid, (app, minute, minute))
            builds[mid] = (app, min(lo, minute), max(hi, minute))
        with self._tx() as c:
            if not c.execute(
                "INSERT OR IGNORE INTO traffic_batches (id, at) VALUES (?, ?)",
                (batch.id, int(batch.at)),
            ).rowcount:
                return  # applied already (a write retried after it went through)
            c.executemany(
                "INSERT INTO traffic_builds (manifest, app, first, last) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (manifest) DO UPDATE SET first = MIN(first, excluded.first), "
                "last = MAX(last, excluded.last)",
                [(mid, app, lo, hi) for mid, (app, lo, hi) in builds.items()],
            )
            ids = {
                mid: c.execute(
                    "SELECT id FROM traffic_builds WHERE manifest = ?", (mid,)
                ).fetchone()[0]
                for mid in builds
            }
            c.executemany(
                f"INSERT INTO traffic (build, minute, {', '.join(LEVEL_NAMES)}) "
                f"VALUES (?, ?, ?, ?, ?) ON CONFLICT (build, minute) DO UPDATE SET "
                + _KEEP_HIGHEST,
                [
                    (ids[mid], minute, *(levels.get(n, 0) for n in LEVEL_NAMES))
                    for (mid, minute), (_, levels) in batch.levels.items()
                ],
            )
            c.executemany(
                f"INSERT INTO traffic (build, minute, {', '.join(ADD_NAMES)}) "
                f"VALUES (?, ?, {', '.join('?' * len(ADD_NAMES))}) "
                "ON CONFLICT (build, minute) DO UPDATE SET "
                + ", ".join(f"{n} = {n} + excluded.{n}" for n in ADD_NAMES),
                [
                    (ids[mid], minute, *(adds.get(n, 0) for n in ADD_NAMES))
                    for (mid, minute), (_, adds) in batch.adds.items()
                ],
            )
            c.executemany(
                "INSERT INTO online (app, day, hour, n) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (app, day, hour) DO UPDATE SET n = n + excluded.n",
                [(app, day, hour, n) for (app, day, hour), n in batch.online.items()],
            )
            over = c.execute("SELECT COUNT(*) FROM traffic_builds").fetchone()[0] - MAX_BUILDS
            if over > 0:
                for (n,) in c.execute(
                    "SELECT id FROM traffic_builds ORDER BY last LIMIT ?", (over,)
                ).fetchall():
                    c.execute("DELETE FROM traffic WHERE build = ?", (n,))
                    c.execute("DELETE FROM traffic_builds WHERE id = ?", (n,))

    def gc(self, now: float) -> None:
        minute = int(now) // 60 - RETENTION_MINUTES
        with self._tx() as c:
            for (n,) in c.execute(
                "SELECT id FROM traffic_builds WHERE first < ?", (minute,)
            ).fetchall():
                c.execute("DELETE FROM traffic WHERE build = ? AND minute < ?", (n, minute))
            c.execute("DELETE FROM traffic_builds WHERE last < ?", (minute,))
            c.execute("DELETE FROM online WHERE day < ?", (int(now) // 86400 - RETENTION_DAYS,))
            c.execute("DELETE FROM forecast_events WHERE at < ?", (now - FORECAST_RETENTION_S,))
            c.execute("DELETE FROM traffic_batches WHERE at < ?", (int(now) - RETENTION_S,))

    def series(self, manifest: bytes) -> tuple[int | None, list[MinuteRow]]:
        with self._lock:
            row = self._conn.execute(
                "SELECT id, first FROM traffic_builds WHERE manifest = ?", (manifest,)
            ).fetchone()
            if row is None:
                return None, []
            cells = self._conn.execute(
                f"SELECT minute, {', '.join(LEVEL_NAMES)}, {', '.join(ADD_NAMES)} FROM traffic "
                "WHERE build = ? ORDER BY minute",
                (row[0],),
            ).fetchall()
        return int(row[1]), minute_rows(cells)

    def online_cells(self, app: str, now: float) -> list[tuple[int, int, int]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT day, hour, n FROM online WHERE app = ? AND day >= ? ORDER BY day, hour",
                (app, int(now) // 86400 - RETENTION_DAYS),
            ).fetchall()
        return [(int(d), int(h), int(n)) for d, h, n in rows]

    def put_forecast(self, manifest: bytes, app: str, body: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO forecast_events (manifest, channel, at, app, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (manifest, str(body.get("channel", "")), float(body.get("at", 0)), app,
                 json.dumps(body)),
            )  # fmt: skip
            over = c.execute("SELECT COUNT(*) FROM forecast_events").fetchone()[0] - MAX_FORECASTS
            if over > 0:
                c.execute(
                    "DELETE FROM forecast_events WHERE rowid IN "
                    "(SELECT rowid FROM forecast_events ORDER BY at LIMIT ?)",
                    (over,),
                )

    def forecasts(self, manifest: bytes) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT body FROM forecast_events WHERE manifest = ? ORDER BY at, channel",
                (manifest,),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def forecasts_since(self, since: float) -> list[tuple[bytes, str, dict[str, Any]]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT manifest, app, body FROM forecast_events WHERE at >= ? ORDER BY at",
                (since,),
            ).fetchall()
        return [(bytes(m), a, json.loads(b)) for m, a, b in rows]


def open_traffic(data_dir: Path, registry: Any = None, db: Any = None) -> TrafficStore:
    """The Redis store beside a Redis registry (``tracker.registry_redis.RedisRegistry``),
    the PostgreSQL one beside a PostgreSQL registry (``db``: its ``tracker.pg.PGDatabase``),
    else ``DIR/traffic.db``."""
    if db is not None:
        from .traffic_pg import PGTraffic

        return PGTraffic(db)
    if registry is not None:
        from .traffic_redis import RedisTraffic

        return RedisTraffic(registry)
    return SQLiteTraffic(data_dir / "traffic.db")
