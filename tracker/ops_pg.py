"""Install outcomes, staged rollouts and the audit log in the registry's PostgreSQL.

Shares :class:`tracker.registry_pg.PGRegistry`'s :class:`~tracker.pg.PGDatabase` (tables in
:data:`tracker.pg.MIGRATIONS`, the shapes of :mod:`tracker.ops_sqlite`'s). Each call is one
transaction; what keeps replicas apart:

* **Outcomes** are frequent, so they do not take the registry's lock. The replay guard is the
  primary key of ``outcome_seen``: of two replicas inserting one digest at once, the second
  waits for the first and then inserts nothing (a replay). An outcome then locks its build's
  row (the upsert), so one build's counters change one outcome at a time; the counter rows are
  written in name order and old rows are swept with ``SKIP LOCKED``, so two outcomes never wait
  on each other in a cycle.
* **Rollouts**: ``update_rollout`` reads the row ``FOR UPDATE``, applies the pure change and
  writes it back, so concurrent changes apply one after the other, each to the other's result.
* **Audit**: appends take a transaction-scoped advisory lock, so entries are numbered in commit
  order and a reader paging with ``before=`` never misses one committed late. Nothing deletes
  audit entries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .backend import AuditEntry
from .ops_sqlite import OpsSnapshot, audit_row
from .outcomes import (
    MAX_RELEASES,
    SERIES_HOURS,
    SERIES_STEP,
    Outcome,
    SeriesRows,
    series_counts,
    summary,
    tallies_of,
)
from .pg import Conn, PGDatabase
from .rollout import MAX_NODES, NodeWas, Rollout

__all__ = ["PGOps", "copy_ops", "ops_empty"]

#: The advisory lock key that orders audit appends (``audit`` in ASCII).
_AUDIT_LOCK = 0x6175646974
#: Expired replay-guard rows one outcome sweeps at most (the rest go with later outcomes).
_SWEEP = 100


class PGOps:
    """A :class:`tracker.backend.OpsStore` in the registry's PostgreSQL database."""

    blocking = True

    def __init__(self, db: PGDatabase) -> None:
        self.db = db

    def close(self) -> None:
        """The registry owns the database's connections."""

    # ---------------------------------------------------------------- outcomes

    def add_outcome(self, o: Outcome, digest: bytes, now: float, window: float) -> bool:
        with self.db.tx("count an install outcome") as c:
            cur = c.execute(  # sweep a slice of expired digests, then guard this one
                "WITH swept AS (DELETE FROM outcome_seen WHERE digest IN (SELECT digest FROM "
                "outcome_seen WHERE until <= %s AND digest <> %s LIMIT %s FOR UPDATE SKIP LOCKED)) "
                "INSERT INTO outcome_seen (digest, until) VALUES (%s, %s) "
                "ON CONFLICT (digest) DO UPDATE SET until = excluded.until "
                "WHERE outcome_seen.until <= %s",
                (now, digest, _SWEEP, digest, now + window, now),
            )
            if cur.rowcount == 0:
                return False
            new_build, hour = False, int(now // SERIES_STEP)
            for mid, build, counts in tallies_of(o):  # in manifest order: no lock cycles
                row = c.execute(  # xmax = 0: the row was inserted (a build not tallied before)
                    "INSERT INTO outcome_builds (manifest, app, build, last) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (manifest) DO UPDATE SET "
                    "last = GREATEST(outcome_builds.last, excluded.last) RETURNING xmax = 0",
                    (mid, o.app, build, now),
                ).fetchone()
                new_build = new_build or bool(row and row[0])
                with c.cursor() as rows:
                    rows.executemany(
                        "INSERT INTO outcome_counts (manifest, name, n) VALUES (%s, %s, %s) "
                        "ON CONFLICT (manifest, name) DO UPDATE "
                        "SET n = outcome_counts.n + excluded.n",
                        [(mid, k, n) for k, n in sorted(counts.items())],
                    )
                    rows.executemany(
                        "INSERT INTO outcome_hours (manifest, hour, name, n) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (manifest, hour, name) DO UPDATE "
                        "SET n = outcome_hours.n + excluded.n",
                        [(mid, hour, k, n) for k, n in sorted(series_counts(counts).items())],
                    )
                c.execute(
                    "DELETE FROM outcome_hours WHERE manifest = %s AND hour <= %s",
                    (mid, hour - SERIES_HOURS),
                )
            over = 0
            if new_build:  # only a new build can take the tally past its bound
                row = c.execute("SELECT COUNT(*) FROM outcome_builds").fetchone()
                over = (int(row[0]) if row else 0) - MAX_RELEASES
            if over > 0:  # the least recently reported builds go (their counters cascade)
                c.execute(
                    "DELETE FROM outcome_builds WHERE manifest IN (SELECT manifest FROM "
                    "outcome_builds WHERE manifest <> ALL(%s) ORDER BY last LIMIT %s "
                    "FOR UPDATE SKIP LOCKED)",
                    ([mid for mid, _, _ in tallies_of(o)], over),
                )
        return True

    def outcome_stats(self, app: str | None) -> list[dict[str, Any]]:
        where, args = ("", ()) if app is None else ("WHERE b.app = %s ", (app,))
        with self.db.connection("read install outcomes") as c:
            builds = c.execute(
                "SELECT b.manifest, b.app, b.build, b.last FROM outcome_builds b "
                + where
                + "ORDER BY b.last DESC, b.build DESC",
                args,
            ).fetchall()
            counts: dict[bytes, dict[str, int]] = {}
            for mid, name, n in c.execute(
                "SELECT c.manifest, c.name, c.n FROM outcome_counts c "
                "JOIN outcome_builds b ON b.manifest = c.manifest " + where,
                args,
            ):
                counts.setdefault(bytes(mid), {})[name] = int(n)
        return [
            summary(bytes(mid), a, int(build), counts.get(bytes(mid), {}), float(last))
            for mid, a, build, last in builds
        ]

    def outcome_series(
        self, app: str | None, since: int
    ) -> dict[bytes, list[tuple[int, str, int]]]:
        where, args = ("", ()) if app is None else ("AND b.app = %s ", (app,))
        out: SeriesRows = {}
        with self.db.connection("read install outcome series") as c:
            for mid, hour, name, n in c.execute(
                "SELECT h.manifest, h.hour, h.name, h.n FROM outcome_hours h "
                "JOIN outcome_builds b ON b.manifest = h.manifest WHERE h.hour >= %s " + where,
                (since, *args),
            ):
                out.setdefault(bytes(mid), []).append((int(hour), name, int(n)))
        return out

    # ---------------------------------------------------------------- rollouts

    def rollout(self, app: str, channel: str) -> Rollout | None:
        with self.db.connection(f"read the rollout of {app}/{channel}") as c:
            row = c.execute(
                "SELECT body FROM rollouts WHERE app = %s AND channel = %s", (app, channel)
            ).fetchone()
        return Rollout.from_json(json.loads(row[0])) if row else None

    def rollout_node(self, key: str, app: str, channel: str, node: bytes, failed: bool) -> NodeWas:
        with self.db.tx(f"note a node's outcome for the rollout of {app}/{channel}") as c:
            while True:
                row = c.execute(
                    "SELECT failed FROM rollout_nodes WHERE key = %s AND node = %s FOR UPDATE",
                    (key, node),
                ).fetchone()
                if row is not None:
                    c.execute(
                        "UPDATE rollout_nodes SET failed = %s WHERE key = %s AND node = %s",
                        (failed, key, node),
                    )
                    return "failed" if row[0] else "ok"
                c.execute(  # the set's row lock orders new nodes (and keeps the count exact)
                    "INSERT INTO rollout_node_sets (key, app, channel, n) VALUES (%s, %s, %s, 0) "
                    "ON CONFLICT (key) DO NOTHING",
                    (key, app, channel),
                )
                full = c.execute(
                    "SELECT n >= %s FROM rollout_node_sets WHERE key = %s FOR UPDATE",
                    (MAX_NODES, key),
                ).fetchone()
                if full is None or full[0]:
                    return "full"
                added = c.execute(
                    "INSERT INTO rollout_nodes (key, node, failed) VALUES (%s, %s, %s) "
                    "ON CONFLICT (key, node) DO NOTHING",
                    (key, node, failed),
                )
                if added.rowcount == 1:
                    c.execute("UPDATE rollout_node_sets SET n = n + 1 WHERE key = %s", (key,))
                    return "new"
                # another replica noted this node meanwhile: read its row (under the lock)

    def drop_rollout_nodes(self, app: str, channel: str, keep: str | None) -> None:
        with self.db.tx(f"forget the old rollout node sets of {app}/{channel}") as c:
            c.execute(  # the nodes cascade
                "DELETE FROM rollout_node_sets WHERE app = %s AND channel = %s "
                "AND key IS DISTINCT FROM %s",
                (app, channel, keep),
            )

    def rollouts(self) -> list[Rollout]:
        with self.db.connection("read rollouts") as c:
            rows = c.execute("SELECT body FROM rollouts ORDER BY app, channel").fetchall()
        return [Rollout.from_json(json.loads(r[0])) for r in rows]

    def put_rollout(self, r: Rollout) -> None:
        with self.db.tx(f"store the rollout of {r.app}/{r.channel}") as c:
            c.execute(
                "INSERT INTO rollouts (app, channel, body) VALUES (%s, %s, %s) "
                "ON CONFLICT (app, channel) DO UPDATE SET body = excluded.body",
                (r.app, r.channel, json.dumps(r.to_json())),
            )

    def update_rollout(
        self, app: str, channel: str, fn: Callable[[Rollout], Rollout]
    ) -> tuple[Rollout, Rollout] | None:
        with self.db.tx(f"change the rollout of {app}/{channel}") as c:
            row = c.execute(
                "SELECT body FROM rollouts WHERE app = %s AND channel = %s FOR UPDATE",
                (app, channel),
            ).fetchone()
            if row is None:
                return None
            before = Rollout.from_json(json.loads(row[0]))
            after = fn(before)
            if after != before:
                c.execute(
                    "UPDATE rollouts SET body = %s WHERE app = %s AND channel = %s",
                    (json.dumps(after.to_json()), app, channel),
                )
        return before, after

    # ---------------------------------------------------------------- audit log

    def audit(self, e: AuditEntry) -> int:
        with self.db.tx("append to the audit log") as c:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_AUDIT_LOCK,))
            row = c.execute(
                "INSERT INTO audit (at, action, actor, token_id, address, target, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING seq",
                (e.at, e.action, e.actor, e.token_id, e.address, e.target, json.dumps(e.detail)),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def audit_page(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        with self.db.connection("read the audit log") as c:
            rows = c.execute(
                "SELECT seq, at, action, actor, token_id, address, target, detail FROM audit "
                "WHERE seq < %s ORDER BY seq DESC LIMIT %s",
                (before if before is not None else 1 << 62, limit),
            ).fetchall()
        return [
            audit_row(
                int(r[0]),
                AuditEntry(float(r[1]), r[2], r[3], r[4], r[5], r[6], json.loads(r[7])),
            )
            for r in rows
        ]


# -------------------------------------------------------------------- moving from SQLite


def ops_empty(c: Conn) -> bool:
    """Whether the database holds no outcomes, rollouts or audit entries."""
    row = c.execute(
        "SELECT EXISTS (SELECT 1 FROM outcome_builds) OR EXISTS (SELECT 1 FROM rollouts) "
        "OR EXISTS (SELECT 1 FROM audit)"
    ).fetchone()
    return not (row and row[0])


def copy_ops(c: Conn, snap: OpsSnapshot) -> dict[str, int]:
    """Write ``DIR/ops.db``'s rows inside the registry copy's transaction (see
    :meth:`tracker.registry_pg.PGRegistry.copy_from_sqlite`); audit numbers are kept and the
    next entry is numbered after them."""
    with c.cursor() as cur:
        cur.executemany(
            "INSERT INTO outcome_builds (manifest, app, build, last) VALUES (%s, %s, %s, %s)",
            snap.builds,
        )
        cur.executemany(
            "INSERT INTO outcome_counts (manifest, name, n) VALUES (%s, %s, %s)", snap.counts
        )
        cur.executemany(
            "INSERT INTO rollouts (app, channel, body) VALUES (%s, %s, %s)", snap.rollouts
        )
        cur.executemany(
            "INSERT INTO audit (seq, at, action, actor, token_id, address, target, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            snap.audit,
        )
    if snap.audit:
        c.execute(
            "SELECT setval(pg_get_serial_sequence('audit', 'seq'), %s)",
            (max(a[0] for a in snap.audit),),
        )
    return {
        "outcome_builds": len(snap.builds),
        "rollouts": len(snap.rollouts),
        "audit": len(snap.audit),
    }
