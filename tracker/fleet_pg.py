"""The fleet view in the registry's PostgreSQL: durable, shared by every replica.

Theory of operation
-------------------
With ``--registry postgresql://``, with or without ``--redis`` (see
:func:`tracker.fleet_store.open_fleet` for why), the fleet lives in the same database as the
registry (tables ``fleet_*`` of :data:`tracker.pg.MIGRATIONS`): every replica answers for the
whole fleet, and a restart keeps the seats and the adoption curves (in memory, the curves start
again).

* ``fleet_seats``: one row per (app, node): ``m`` (the first 16 hex digits of the manifest it
  runs, ``-`` while updating), last seen, client version, last outcome (``kind,code,to,at``);
  the same fields as :mod:`tracker.fleet_redis`'s seats.
* ``fleet_builds``: ``m`` -> ``manifest id|build`` and when a node last ran it;
  ``fleet_series``: the curves, one row per (app, bucket) sampled by whichever replica gets
  there first (``ON CONFLICT DO NOTHING``); ``fleet_apps``; ``fleet_recent``: the last
  ``RECENT_OUTCOMES`` outcomes whole, for the node view; ``fleet_apps.joined``: the seats made
  by a sighting that names no complete build (joins, :mod:`tracker.fleet`), sampled into the
  curves' rows as ``+``.
* ``fleet_counts``: seats per build (``what`` ``b``, ``key`` ``m``, ``-`` for updating) and
  per client version (``c``), per app: what every view reads, a few rows however many seats.

**Counters that cannot drift.** Recording is :class:`tracker.fleet_remote.WriteBehind`'s:
every ``FLUSH_S`` one transaction upserts the pending seats. Each upsert also stores the seat's
build and client *before* it (``pm``, ``pc``; ``NULL`` for a new seat) and returns them, so the
transaction knows exactly how each seat moved, even when two replicas write the same node at
once (the second upsert waits for the first's row and sees its result), and adds the moves to
``fleet_counts`` before it commits. Expiry is a ``DELETE`` of a slice of the seats unseen for
``ttl`` that returns what it removed and takes it off the counters in the same transaction.
Locks are taken in one order, seats (in key order), then builds, then counters (each in key
order), so writers never wait on each other in a cycle. Client versions beyond
``MAX_CLIENTS`` per app are counted as ``other`` when read.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio

from .errors import Conflict
from .fleet import FLEET_TTL, MAX_CLIENTS, MAX_RELEASES, SERIES_BUCKET, SERIES_POINTS
from .fleet_remote import RECENT_OUTCOMES, Batch, WriteBehind, app_view_of, seat_of
from .pg import Conn, PGDatabase

if TYPE_CHECKING:
    from .fleet_redis import RedisFleet

__all__ = ["PGFleet"]

#: Seats examined per :meth:`PGFleet.gc` for expiry.
SWEEP_COUNT = 5000

#: Seats upserted per statement: one statement per row costs the tracker's interpreter more
#: than the database; a few thousand rows stay far inside ``STATEMENT_TIMEOUT_MS``.
SEATS_PER_STATEMENT = 2000

_SEAT = (  # arrays in, rows taken in their order (the lock order, see the module docstring)
    "INSERT INTO fleet_seats AS s (app, node, m, seen, client, outcome) "
    "SELECT a, n, m, t, c, o FROM unnest(%s::text[], %s::bytea[], %s::text[], %s::bigint[], "
    "%s::text[], %s::text[]) WITH ORDINALITY AS u(a, n, m, t, c, o, i) ORDER BY i "
    "ON CONFLICT (app, node) DO UPDATE SET "
    "pm = s.m, pc = s.client, "
    "m = CASE WHEN excluded.m = '-' THEN s.m ELSE excluded.m END, "
    "seen = GREATEST(s.seen, excluded.seen), "
    "client = CASE WHEN excluded.client = 'unknown' THEN s.client ELSE excluded.client END, "
    "outcome = CASE WHEN excluded.outcome = '' THEN s.outcome ELSE excluded.outcome END "
    "RETURNING s.app, s.m, s.seen, s.client, s.pm, s.pc"
)
_BUILD = (
    "INSERT INTO fleet_builds AS b (app, m, info, last_seen) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (app, m) DO UPDATE SET "
    "info = CASE WHEN excluded.info = '' THEN b.info ELSE excluded.info END, "
    "last_seen = GREATEST(b.last_seen, excluded.last_seen)"
)
_COUNT = (
    "INSERT INTO fleet_counts AS k (app, what, key, n) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (app, what, key) DO UPDATE SET n = k.n + excluded.n"
)
#: (app, what, key) -> change of its count
Moves = Counter[tuple[str, str, str]]


def _move(moves: Moves, app: str, what: str, old: str | None, new: str) -> None:
    """A seat went from ``old`` (``None``: it is new) to ``new``."""
    if old != new:
        if old is not None:
            moves[(app, what, old)] -= 1
        moves[(app, what, new)] += 1


def _count(c: Conn, moves: Moves) -> None:
    """Apply ``moves`` to ``fleet_counts`` in key order; drop the counters that reach 0."""
    rows = sorted((*k, n) for k, n in moves.items() if n)
    with c.cursor() as cur:
        cur.executemany(_COUNT, rows)
        cur.executemany(
            "DELETE FROM fleet_counts WHERE app = %s AND what = %s AND key = %s AND n <= 0",
            [r[:3] for r in rows if r[3] < 0],
        )


def _bounded(clients: dict[str, int]) -> dict[str, int]:
    """At most ``MAX_CLIENTS`` versions (the most common), the rest as ``other``."""
    if len(clients) <= MAX_CLIENTS:
        return clients
    ranked = sorted(clients.items(), key=lambda kv: -kv[1])
    out = dict(ranked[: MAX_CLIENTS - 1])
    out["other"] = out.get("other", 0) + sum(n for _, n in ranked[MAX_CLIENTS - 1 :])
    return out


class PGFleet(WriteBehind):
    """The fleet in PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        db: PGDatabase,
        *,
        ttl: float = FLEET_TTL,
        bucket: int = SERIES_BUCKET,
        points: int = SERIES_POINTS,
    ) -> None:
        super().__init__()
        self.db = db
        self.ttl, self.bucket, self.points = ttl, bucket, points
        self._sampled = -1

    def close(self) -> None:
        """The registry owns the database's connections."""

    def write(self, batch: Batch) -> int:
        pending, recent = batch
        if not pending and not recent:
            return 0
        seats = sorted(
            (app, node, m or "-", int(seen), client or "unknown", out)
            for (node, app), (m, _, seen, client, out) in pending.items()
        )
        infos = {(app, m): info for (_, app), (m, info, *_) in pending.items() if m}
        with self.db.tx("record the fleet") as c, c.cursor() as cur:
            cur.executemany(
                "INSERT INTO fleet_apps (app) VALUES (%s) ON CONFLICT DO NOTHING",
                [(a,) for a in sorted({app for _, app in pending})],
            )
            ran: dict[tuple[str, str], int] = {}  # the build each seat runs now: last seen
            joined: dict[str, int] = {}  # per app: seats made with no complete build
            moves: Moves = Counter()
            # (no seats when every sighting was dropped but an outcome's whole record)
            for lo in range(0, len(seats), SEATS_PER_STATEMENT):
                part = seats[lo : lo + SEATS_PER_STATEMENT]
                columns = [list(col) for col in zip(*part, strict=True)]
                for app, m, seen, client, pm, pc in cur.execute(_SEAT, columns):
                    if m != "-":
                        ran[(app, m)] = max(ran.get((app, m), 0), int(seen))
                    elif pm is None:  # a seat just made (a new seat has no build before it)
                        joined[app] = joined.get(app, 0) + 1
                    _move(moves, app, "b", pm, m)
                    _move(moves, app, "c", pc, client)
            builds = sorted(
                (app, m, infos.get((app, m), ""), float(seen)) for (app, m), seen in ran.items()
            )
            cur.executemany(_BUILD, builds)
            cur.executemany(
                "UPDATE fleet_apps SET joined = joined + %s WHERE app = %s",
                [(n, app) for app, n in sorted(joined.items())],
            )
            _count(c, moves)
            if recent:
                rows = []
                for raw in recent:
                    o = json.loads(raw)
                    rows.append((bytes.fromhex(o.pop("node_id")), json.dumps(o)))
                cur.executemany("INSERT INTO fleet_recent (node, body) VALUES (%s, %s)", rows)
        return len(pending)

    async def _call(self, fn: Any, *args: Any) -> Any:
        """In a worker thread; :class:`~tracker.errors.RegistryUnavailable` on failure."""
        return await trio.to_thread.run_sync(fn, *args)

    # ------------------------------------------------------------------ expiry and curves

    def _gc(self, now: float) -> int:
        with self.db.tx("expire the fleet") as c:
            gone = c.execute(
                "DELETE FROM fleet_seats WHERE (app, node) IN (SELECT app, node FROM "
                "fleet_seats WHERE seen < %s LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING app, m, client",
                (int(now - self.ttl), SWEEP_COUNT),
            ).fetchall()
            moves: Moves = Counter()
            for app, m, client in gone:
                moves[(app, "b", m)] -= 1
                moves[(app, "c", client)] -= 1
            _count(c, moves)
        with self.db.tx("expire the fleet") as c:  # (builds after counters: the lock order)
            c.execute(  # forget builds nobody runs, in apps past the bound
                "DELETE FROM fleet_builds b WHERE b.app IN (SELECT app FROM fleet_builds "
                "GROUP BY app HAVING COUNT(*) > %s) AND NOT EXISTS (SELECT 1 FROM fleet_counts "
                "k WHERE k.app = b.app AND k.what = 'b' AND k.key = b.m AND k.n > 0)",
                (MAX_RELEASES,),
            )
            c.execute(
                "DELETE FROM fleet_recent WHERE seq <= (SELECT MAX(seq) FROM fleet_recent) - %s",
                (RECENT_OUTCOMES,),
            )
            b = int(now) // self.bucket
            sampled = []
            if b != self._sampled:
                self._sampled = b
                for (app,) in c.execute("SELECT app FROM fleet_apps ORDER BY app").fetchall():
                    if self._sample(c, app, b * self.bucket):
                        sampled.append(app)
        for app in sampled:  # once per bucket, by the replica that took the sample
            self._recount(app)
        return len(gone)

    def _recount(self, app: str) -> None:
        """Count the app's seats afresh. The counters cannot drift while every replica moves
        them, but a tracker from before them (during a rolling upgrade) moves seats without
        them; this heals that within a bucket. Exact under concurrent writes: the table lock
        holds back every writer's counter update until the recount commits, so what a writer
        changed in the seats is not yet visible to the count, and its moves apply on top."""
        with self.db.tx("recount the fleet") as c:
            c.execute("LOCK TABLE fleet_counts IN EXCLUSIVE MODE")
            c.execute("DELETE FROM fleet_counts WHERE app = %s", (app,))
            for what, col in (("b", "m"), ("c", "client")):
                c.execute(
                    "INSERT INTO fleet_counts (app, what, key, n) SELECT app, %s, "
                    + col  # one of two column names, never input
                    + ", COUNT(*) FROM fleet_seats WHERE app = %s GROUP BY app, "
                    + col,
                    (what, app),
                )

    def _sample(self, c: Conn, app: str, at: int) -> bool:
        """Store the app's counts as the sample of the bucket starting ``at``, unless another
        replica did; whether this one did."""
        counts = self._counts(c, app)
        counts.pop("-", None)
        row = c.execute("SELECT joined FROM fleet_apps WHERE app = %s", (app,)).fetchone()
        counts["+"] = int(row[0]) if row else 0
        took = c.execute(
            "INSERT INTO fleet_series (app, at, counts) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (app, at, json.dumps(counts)),
        ).rowcount
        c.execute(
            "DELETE FROM fleet_series WHERE app = %s AND at < (SELECT MIN(at) FROM (SELECT at "
            "FROM fleet_series WHERE app = %s ORDER BY at DESC LIMIT %s) newest)",
            (app, app, self.points),
        )
        return took == 1

    # ------------------------------------------------------------------ moving from Redis

    def copy_from_redis(self, src: RedisFleet) -> dict[str, int]:
        """Copy the fleet that replicas kept in Redis (``tracker registry copy --fleet-from``)
        into this database, whose fleet must be empty: seats with their counters, builds,
        adoption samples and kept outcomes, in one transaction (a refusal or a failure
        writes nothing). Stop the trackers first: what they record meanwhile is not copied.

        Raises:
            Conflict: the database already holds a fleet.
            RegistryUnavailable: PostgreSQL failed; nothing was written.
        """
        counts = {"fleet_seats": 0, "fleet_builds": 0, "fleet_series": 0, "fleet_recent": 0}
        with self.db.tx("copy the fleet from Redis") as c, c.cursor() as cur:
            if any(
                c.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()  # (names from this code)
                for t in ("fleet_apps", "fleet_seats", "fleet_series", "fleet_recent")
            ):
                raise Conflict(
                    f"the database at {self.db.where} already holds a fleet",
                    fix="copy the fleet before the trackers on PostgreSQL start recording",
                )
            moves: Moves = Counter()
            for app in src.apps():
                c.execute(
                    "INSERT INTO fleet_apps (app, joined) VALUES (%s, %s)", (app, src.joined(app))
                )
                with cur.copy(
                    "COPY fleet_seats (app, node, m, seen, client, outcome) FROM STDIN"
                ) as copy:
                    for chunk in src.seat_chunks(app):
                        for node, m, seen, client, outcome in chunk:
                            copy.write_row((app, node, m, seen, client, outcome))
                            _move(moves, app, "b", None, m)
                            _move(moves, app, "c", None, client)
                        counts["fleet_seats"] += len(chunk)
                builds = [(app, m, info, seen) for m, info, seen in src.builds(app)]
                cur.executemany(_BUILD, builds)
                series = [(app, at, body) for at, body in src.series(app)]
                cur.executemany(
                    "INSERT INTO fleet_series (app, at, counts) VALUES (%s, %s, %s)", series
                )
                counts["fleet_builds"] += len(builds)
                counts["fleet_series"] += len(series)
            _count(c, moves)
            rows = []
            for raw in src.recent():
                o = json.loads(raw)
                rows.append((bytes.fromhex(o.pop("node_id")), json.dumps(o)))
            cur.executemany("INSERT INTO fleet_recent (node, body) VALUES (%s, %s)", rows)
            counts["fleet_recent"] = len(rows)
        return counts

    # ------------------------------------------------------------------ views

    @staticmethod
    def _tally(c: Conn, app: str | None) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
        """Per app (one, or all): seats per build ``m`` and per client version."""
        where, args = ("", ()) if app is None else ("AND app = %s ", (app,))
        out: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        for a, what, key, n in c.execute(
            "SELECT app, what, key, n FROM fleet_counts WHERE n > 0 " + where, args
        ):
            builds, clients = out.setdefault(a, ({}, {}))
            (builds if what == "b" else clients)[key] = int(n)
        return out

    def _counts(self, c: Conn, app: str) -> dict[str, int]:
        return self._tally(c, app).get(app, ({}, {}))[0]

    def _app_view(self, app: str, now: float) -> dict[str, Any] | None:
        with self.db.connection(f"read the fleet of {app}") as c:
            found = c.execute("SELECT joined FROM fleet_apps WHERE app = %s", (app,)).fetchone()
            if not found:
                return None
            counts, clients = self._tally(c, app).get(app, ({}, {}))
            builds = c.execute(
                "SELECT m, info, last_seen FROM fleet_builds WHERE app = %s", (app,)
            ).fetchall()
            series = [
                (int(at), json.loads(raw))
                for at, raw in c.execute(
                    "SELECT at, counts FROM fleet_series WHERE app = %s ORDER BY at", (app,)
                )
            ]
        clients = _bounded(clients)
        info = {m: text for m, text, _ in builds if text}
        seen = {m: float(last) for m, _, last in builds}
        return app_view_of(
            app, now, counts, info, seen, series, clients, self.ttl, self.bucket, int(found[0])
        )

    def _node_view(self, node: bytes) -> dict[str, Any] | None:
        with self.db.connection("read a node of the fleet") as c:
            rows = c.execute(
                "SELECT s.app, s.seen, s.client, s.outcome, b.info FROM fleet_seats s "
                "LEFT JOIN fleet_builds b ON b.app = s.app AND b.m = s.m "
                "WHERE s.node = %s ORDER BY s.app",
                (node,),
            ).fetchall()
            if not rows:
                return None
            recent = c.execute(
                "SELECT body FROM fleet_recent WHERE node = %s ORDER BY seq DESC LIMIT 20",
                (node,),
            ).fetchall()
        seats = [
            seat_of(app, int(seen), client, out, info or None, self.ttl)
            for app, seen, client, out, info in rows
        ]
        return {
            "node_id": node.hex(),
            "apps": seats,
            "recent_outcomes": [json.loads(r[0]) for r in recent],
        }

    def _gauges(self) -> dict[str, Any]:
        out: dict[str, Any] = {"builds": [], "clients": [], "updating": []}
        with self.db.connection("read the fleet's gauges") as c:
            tally = self._tally(c, None)
            infos = {
                (app, m): info
                for app, m, info in c.execute("SELECT app, m, info FROM fleet_builds")
                if info
            }
        for app, (builds, clients) in sorted(tally.items()):
            for m, n in builds.items():
                if m == "-":
                    out["updating"].append((app, n))
                elif (app, m) in infos:
                    manifest, build = infos[(app, m)].split("|")
                    out["builds"].append((app, manifest, int(build), n))
            out["clients"] += [(app, k, n) for k, n in _bounded(clients).items()]
        return out
