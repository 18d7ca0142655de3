"""The traffic series in the registry's PostgreSQL: one series for replicas on any host.

Shares :class:`tracker.registry_pg.PGRegistry`'s :class:`~tracker.pg.PGDatabase` (tables
``traffic_*`` of :data:`tracker.pg.MIGRATIONS`, the shapes of
:class:`tracker.traffic_store.SQLiteTraffic`'s). A recorder's batch is one transaction, so it
applies whole or not at all (the recorder keeps a batch that failed for the next flush). What
keeps replicas apart:

* **Minutes**: a (build, minute) row takes a batch's levels and adds in one upsert: a level
  keeps the highest value written (``GREATEST`` ignores the ``NULL`` of a minute not sampled),
  adds are summed. A batch first upserts its builds' rows in manifest order, which locks them:
  two replicas writing the same build's minutes take turns on that row, and rows are locked in
  one global order (builds, their minutes, online cells, each sorted), so two flushes never
  wait on each other in a cycle.
* **Once**: the batch's id goes into ``traffic_batches`` first, in the same transaction: a
  batch retried after a commit whose reply was lost finds its id and changes nothing (a retry
  racing a first try still running waits on the id's row, then finds it).
* **Bounds**: only a batch that added a build counts the builds; the ones written longest ago
  beyond ``MAX_BUILDS`` go (their minutes cascade), skipping any another flush holds. ``gc``
  locks the builds it trims with ``SKIP LOCKED`` too (a build being written is trimmed at the
  next ``gc``), and forecasts are trimmed the same way (``traffic_forecast_events``: one row
  per event of a build, keyed by manifest, channel and time).

``tracker registry copy`` brings ``DIR/traffic.db`` along (:func:`copy_traffic`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .forecast import MAX_FORECASTS
from .pg import Conn, PGDatabase
from .registry_sqlite import read_only
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
from .traffic_store import minute_rows

__all__ = ["PGTraffic", "copy_traffic", "traffic_empty"]

_COLUMNS = ", ".join((*LEVEL_NAMES, *ADD_NAMES))
_MINUTE = (
    f"INSERT INTO traffic_minutes AS t (build, minute, {_COLUMNS}) "
    f"VALUES (%s, %s, {', '.join(['%s'] * (len(LEVEL_NAMES) + len(ADD_NAMES)))}) "
    "ON CONFLICT (build, minute) DO UPDATE SET "
    + ", ".join(
        [f"{c} = GREATEST(t.{c}, excluded.{c})" for c in LEVEL_NAMES]
        + [f"{c} = t.{c} + excluded.{c}" for c in ADD_NAMES]
    )
)


#: A forecast's key (a build, a channel, an event's time).
_EVENT = "(manifest, channel, at)"


def _events(src: Any) -> str:
    """The forecasts of a ``traffic.db``: a file not opened since a build could have several
    still holds one per build (its publish's) in ``forecasts``."""
    old = src.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forecasts'"
    ).fetchone()
    if not old:
        return "forecast_events"
    return (
        "(SELECT manifest, COALESCE(json_extract(body, '$.channel'), '') AS channel, at, app, "
        "body FROM forecasts)"
    )


class PGTraffic:
    """A :class:`tracker.traffic_store.TrafficStore` in the registry's PostgreSQL database."""

    blocking = True

    def __init__(self, db: PGDatabase) -> None:
        self.db = db

    def close(self) -> None:
        """The registry owns the database's connections."""

    def write(self, batch: TrafficBatch) -> None:
        builds: dict[bytes, tuple[str, int, int]] = {}
        cells: dict[tuple[bytes, int], list[int | None]] = {}
        for (mid, minute), (_, levels) in batch.levels.items():
            cells[(mid, minute)] = [*(levels.get(n, 0) for n in LEVEL_NAMES), *[0] * len(ADD_NAMES)]
        for (mid, minute), (_, adds) in batch.adds.items():
            row = cells.setdefault(
                (mid, minute), [*[None] * len(LEVEL_NAMES), *[0] * len(ADD_NAMES)]
            )
            row[len(LEVEL_NAMES) :] = [adds.get(n, 0) for n in ADD_NAMES]
        for (mid, minute), (app, _) in [*batch.levels.items(), *batch.adds.items()]:
            _, lo, hi = builds.get(mid, (app, minute, minute))
            builds[mid] = (app, min(lo, minute), max(hi, minute))
        online = sorted((app, day, hour, n) for (app, day, hour), n in batch.online.items())
        if not (builds or online):
            return
        with self.db.tx("write the traffic series") as c, c.cursor() as cur:
            if not cur.execute(  # first: a retry of this batch waits here for the first try
                "INSERT INTO traffic_batches (id, at) VALUES (%s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING 1",
                (batch.id, int(batch.at)),
            ).fetchone():
                return  # applied already: the reply to an earlier try was lost
            ids: dict[bytes, int] = {}
            added = False
            for mid, (app, lo, hi) in sorted(builds.items()):  # locks each build's row
                got = cur.execute(
                    "INSERT INTO traffic_builds AS b (manifest, app, first, last) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (manifest) DO UPDATE SET first = "
                    "LEAST(b.first, excluded.first), last = GREATEST(b.last, excluded.last) "
                    "RETURNING id, xmax = 0",
                    (mid, app, lo, hi),
                ).fetchone()
                assert got is not None
                ids[mid] = int(got[0])
                added = added or bool(got[1])
            cur.executemany(
                _MINUTE,
                sorted((ids[mid], minute, *values) for (mid, minute), values in cells.items()),
            )
            cur.executemany(
                "INSERT INTO traffic_online AS o (app, day, hour, n) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (app, day, hour) DO UPDATE SET n = o.n + excluded.n",
                online,
            )
            if added:  # only a new build can take the series past its bound
                count = cur.execute("SELECT COUNT(*) FROM traffic_builds").fetchone()
                over = (int(count[0]) if count else 0) - MAX_BUILDS
                if over > 0:
                    cur.execute(
                        "DELETE FROM traffic_builds WHERE id IN (SELECT id FROM traffic_builds "
                        "ORDER BY last LIMIT %s FOR UPDATE SKIP LOCKED)",
                        (over,),
                    )

    def gc(self, now: float) -> None:
        minute = int(now) // 60 - RETENTION_MINUTES
        with self.db.tx("trim the traffic series") as c:
            c.execute(  # the old minutes of builds no other flush is writing now
                "DELETE FROM traffic_minutes t USING (SELECT id FROM traffic_builds "
                "WHERE first < %s ORDER BY id FOR UPDATE SKIP LOCKED) b "
                "WHERE t.build = b.id AND t.minute < %s",
                (minute, minute),
            )
            c.execute(
                "DELETE FROM traffic_builds WHERE id IN (SELECT id FROM traffic_builds "
                "WHERE last < %s FOR UPDATE SKIP LOCKED)",
                (minute,),
            )
            c.execute(
                "DELETE FROM traffic_online WHERE day < %s", (int(now) // 86400 - RETENTION_DAYS,)
            )
            c.execute("DELETE FROM traffic_batches WHERE at < %s", (int(now) - RETENTION_S,))
            c.execute(
                f"DELETE FROM traffic_forecast_events WHERE {_EVENT} IN (SELECT manifest, "
                "channel, at FROM traffic_forecast_events WHERE at < %s FOR UPDATE SKIP LOCKED)",
                (now - FORECAST_RETENTION_S,),
            )

    def series(self, manifest: bytes) -> tuple[int | None, list[MinuteRow]]:
        with self.db.connection("read the traffic series") as c:
            row = c.execute(
                "SELECT id, first FROM traffic_builds WHERE manifest = %s", (manifest,)
            ).fetchone()
            if row is None:
                return None, []
            cells = c.execute(
                f"SELECT minute, {_COLUMNS} FROM traffic_minutes WHERE build = %s ORDER BY minute",
                (row[0],),
            ).fetchall()
        return int(row[1]), minute_rows(cells)

    def online_cells(self, app: str, now: float) -> list[tuple[int, int, int]]:
        with self.db.connection("read the online hours") as c:
            rows = c.execute(
                "SELECT day, hour, n FROM traffic_online WHERE app = %s AND day >= %s "
                "ORDER BY day, hour",
                (app, int(now) // 86400 - RETENTION_DAYS),
            ).fetchall()
        return [(int(d), int(h), int(n)) for d, h, n in rows]

    def put_forecast(self, manifest: bytes, app: str, body: dict[str, Any]) -> None:
        key = (manifest, str(body.get("channel", "")), float(body.get("at", 0)))
        with self.db.tx("record a forecast") as c:
            row = c.execute(
                "INSERT INTO traffic_forecast_events (manifest, channel, at, app, body) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (manifest, channel, at) DO UPDATE SET "
                "app = excluded.app, body = excluded.body RETURNING xmax = 0",
                (*key, app, json.dumps(body)),
            ).fetchone()
            if not (row and row[0]):
                return
            count = c.execute("SELECT COUNT(*) FROM traffic_forecast_events").fetchone()
            over = (int(count[0]) if count else 0) - MAX_FORECASTS
            if over > 0:
                c.execute(
                    f"DELETE FROM traffic_forecast_events WHERE {_EVENT} IN (SELECT manifest, "
                    "channel, at FROM traffic_forecast_events WHERE "
                    f"{_EVENT} <> (%s, %s, %s) ORDER BY at LIMIT %s FOR UPDATE SKIP LOCKED)",
                    (*key, over),
                )

    def forecasts(self, manifest: bytes) -> list[dict[str, Any]]:
        with self.db.connection("read a build's forecasts") as c:
            rows = c.execute(
                "SELECT body FROM traffic_forecast_events WHERE manifest = %s ORDER BY at, channel",
                (manifest,),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def forecasts_since(self, since: float) -> list[tuple[bytes, str, dict[str, Any]]]:
        with self.db.connection("read forecasts") as c:
            rows = c.execute(
                "SELECT manifest, app, body FROM traffic_forecast_events WHERE at >= %s "
                "ORDER BY at",
                (since,),
            ).fetchall()
        return [(bytes(m), a, json.loads(b)) for m, a, b in rows]


# -------------------------------------------------------------------- moving from SQLite


def traffic_empty(c: Conn) -> bool:
    """Whether the database holds no traffic series, online hours or forecasts."""
    row = c.execute(
        "SELECT EXISTS (SELECT 1 FROM traffic_builds) OR EXISTS (SELECT 1 FROM traffic_online) "
        "OR EXISTS (SELECT 1 FROM traffic_forecast_events)"
    ).fetchone()
    return not (row and row[0])


def copy_traffic(c: Conn, path: Path) -> dict[str, int]:
    """Write ``DIR/traffic.db``'s rows inside the registry copy's transaction (see
    :meth:`tracker.registry_pg.PGRegistry.copy_from_sqlite`), read in one snapshot. Build
    numbers are kept (the next build is numbered after them); the minutes are streamed with
    ``COPY``, never held in memory whole."""
    with read_only(path) as src, c.cursor() as cur:
        builds = src.execute("SELECT id, manifest, app, first, last FROM traffic_builds").fetchall()
        cur.executemany(
            "INSERT INTO traffic_builds (id, manifest, app, first, last) "
            "VALUES (%s, %s, %s, %s, %s)",
            builds,
        )
        minutes = 0
        have = {row[1] for row in src.execute("PRAGMA table_info(traffic)")}
        columns = ", ".join(c if c in have else "0" for c in (*LEVEL_NAMES, *ADD_NAMES))
        with cur.copy(f"COPY traffic_minutes (build, minute, {_COLUMNS}) FROM STDIN") as cp:
            # (a file the tracker has not opened since the patches' split has no columns for it)
            for row in src.execute(f"SELECT build, minute, {columns} FROM traffic"):
                cp.write_row(row)
                minutes += 1
        online = src.execute("SELECT app, day, hour, n FROM online").fetchall()
        cur.executemany(
            "INSERT INTO traffic_online (app, day, hour, n) VALUES (%s, %s, %s, %s)", online
        )
        forecasts = src.execute(
            f"SELECT manifest, channel, at, app, body FROM {_events(src)}"
        ).fetchall()
        cur.executemany(
            "INSERT INTO traffic_forecast_events (manifest, channel, at, app, body) "
            "VALUES (%s, %s, %s, %s, %s)",
            forecasts,
        )
    if builds:
        c.execute(
            "SELECT setval(pg_get_serial_sequence('traffic_builds', 'id'), %s)",
            (max(b[0] for b in builds),),
        )
    return {"traffic_builds": len(builds), "traffic_minutes": minutes, "forecasts": len(forecasts)}
