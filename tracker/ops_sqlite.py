"""Install outcomes, staged rollouts and the audit log in SQLite: ``DIR/ops.db``, the default.

A file of its own beside ``registry.db`` (see :mod:`tracker.backend`): replicas sharing ``DIR``
share it, as they share the registry. One transaction per change, under a lock that serialises
use of the one connection; ``BEGIN IMMEDIATE`` serialises the replicas. The audit table is only
ever inserted into.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import AuditEntry
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
from .registry_sqlite import SQLiteFile, read_only
from .rollout import MAX_NODES, NodeWas, Rollout

__all__ = ["OpsSnapshot", "SQLiteOps", "audit_row", "read_ops_snapshot"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcome_builds (
    manifest BLOB PRIMARY KEY, app TEXT NOT NULL, build INTEGER NOT NULL, last REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outcome_builds_by_last ON outcome_builds(last);
CREATE TABLE IF NOT EXISTS outcome_counts (
    manifest BLOB NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (manifest, name)
);
CREATE TABLE IF NOT EXISTS outcome_hours (
    manifest BLOB NOT NULL, hour INTEGER NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (manifest, hour, name)
);
CREATE TABLE IF NOT EXISTS outcome_seen (digest BLOB PRIMARY KEY, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outcome_seen_by_until ON outcome_seen(until);
CREATE TABLE IF NOT EXISTS rollouts (
    app TEXT NOT NULL, channel TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (app, channel)
);
CREATE TABLE IF NOT EXISTS rollout_node_sets (
    key TEXT PRIMARY KEY, app TEXT NOT NULL, channel TEXT NOT NULL, n INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_nodes (
    key TEXT NOT NULL, node BLOB NOT NULL, failed INTEGER NOT NULL, PRIMARY KEY (key, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL,
    actor TEXT NOT NULL, token_id TEXT NOT NULL, address TEXT NOT NULL, target TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


def audit_row(seq: int, e: AuditEntry) -> dict[str, Any]:
    """An audit entry as ``GET /v1/audit`` shows it (both stores)."""
    return {
        "seq": seq,
        "at": e.at,
        "action": e.action,
        "actor": e.actor,
        "token_id": e.token_id,
        "address": e.address,
        "target": e.target,
        "detail": e.detail,
    }


@dataclass(frozen=True)
class OpsSnapshot:
    """All of ``DIR/ops.db``'s rows, as ``tracker registry copy`` moves them (columns in the
    order of the tables' definitions above; the audit log by seq)."""

    builds: list[tuple[bytes, str, int, float]]
    counts: list[tuple[bytes, str, int]]
    rollouts: list[tuple[str, str, str]]
    audit: list[tuple[int, float, str, str, str, str, str, str]]


def read_ops_snapshot(path: Path) -> OpsSnapshot:
    """Read ``DIR/ops.db`` in one consistent snapshot, without writing to it."""
    with read_only(path) as conn:
        return OpsSnapshot(
            conn.execute("SELECT manifest, app, build, last FROM outcome_builds").fetchall(),
            conn.execute("SELECT manifest, name, n FROM outcome_counts").fetchall(),
            conn.execute("SELECT app, channel, body FROM rollouts").fetchall(),
            conn.execute(
                "SELECT seq, at, action, actor, token_id, address, target, detail FROM audit "
                "ORDER BY seq"
            ).fetchall(),
        )


class SQLiteOps(SQLiteFile):
    """A :class:`tracker.backend.OpsStore` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    # ---------------------------------------------------------------- outcomes

    def add_outcome(self, o: Outcome, digest: bytes, now: float, window: float) -> bool:
        with self._tx() as c:
            c.execute("DELETE FROM outcome_seen WHERE until <= ?", (now,))
            cur = c.execute(
                "INSERT OR IGNORE INTO outcome_seen (digest, until) VALUES (?, ?)",
                (digest, now + window),
            )
            if cur.rowcount == 0:
                return False
            hour = int(now // SERIES_STEP)
            for mid, build, counts in tallies_of(o):
                c.execute(
                    "INSERT INTO outcome_builds (manifest, app, build, last) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (manifest) DO UPDATE SET last = excluded.last",
                    (mid, o.app, build, now),
                )
                c.executemany(
                    "INSERT INTO outcome_counts (manifest, name, n) VALUES (?, ?, ?) "
                    "ON CONFLICT (manifest, name) DO UPDATE SET n = n + excluded.n",
                    [(mid, k, n) for k, n in counts.items()],
                )
                c.executemany(
                    "INSERT INTO outcome_hours (manifest, hour, name, n) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (manifest, hour, name) DO UPDATE SET n = n + excluded.n",
                    [(mid, hour, k, n) for k, n in series_counts(counts).items()],
                )
                c.execute(
                    "DELETE FROM outcome_hours WHERE manifest = ? AND hour <= ?",
                    (mid, hour - SERIES_HOURS),
                )
            over = c.execute("SELECT COUNT(*) FROM outcome_builds").fetchone()[0] - MAX_RELEASES
            if over > 0:
                old = c.execute(
                    "SELECT manifest FROM outcome_builds ORDER BY last LIMIT ?", (over,)
                ).fetchall()
                for (mid,) in old:
                    c.execute("DELETE FROM outcome_counts WHERE manifest = ?", (mid,))
                    c.execute("DELETE FROM outcome_hours WHERE manifest = ?", (mid,))
                    c.execute("DELETE FROM outcome_builds WHERE manifest = ?", (mid,))
        return True

    def outcome_stats(self, app: str | None) -> list[dict[str, Any]]:
        with self._lock:
            builds = self._conn.execute(
                "SELECT manifest, app, build, last FROM outcome_builds "
                "WHERE ? IS NULL OR app = ? ORDER BY last DESC, build DESC",
                (app, app),
            ).fetchall()
            counts: dict[bytes, dict[str, int]] = {}
            for mid, name, n in self._conn.execute(
                "SELECT c.manifest, c.name, c.n FROM outcome_counts c "
                "JOIN outcome_builds b ON b.manifest = c.manifest WHERE ? IS NULL OR b.app = ?",
                (app, app),
            ):
                counts.setdefault(bytes(mid), {})[name] = n
        return [
            summary(bytes(mid), a, build, counts.get(bytes(mid), {}), last)
            for mid, a, build, last in builds
        ]

    def outcome_series(
        self, app: str | None, since: int
    ) -> dict[bytes, list[tuple[int, str, int]]]:
        out: SeriesRows = {}
        with self._lock:
            for mid, hour, name, n in self._conn.execute(
                "SELECT h.manifest, h.hour, h.name, h.n FROM outcome_hours h "
                "JOIN outcome_builds b ON b.manifest = h.manifest "
                "WHERE (? IS NULL OR b.app = ?) AND h.hour >= ?",
                (app, app, since),
            ):
                out.setdefault(bytes(mid), []).append((hour, name, n))
        return out

    # ---------------------------------------------------------------- rollouts

    def rollout(self, app: str, channel: str) -> Rollout | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT body FROM rollouts WHERE app = ? AND channel = ?", (app, channel)
            ).fetchone()
        return Rollout.from_json(json.loads(row[0])) if row else None

    def rollout_node(self, key: str, app: str, channel: str, node: bytes, failed: bool) -> NodeWas:
        with self._tx() as c:
            row = c.execute(
                "SELECT failed FROM rollout_nodes WHERE key = ? AND node = ?", (key, node)
            ).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO rollout_node_sets (key, app, channel, n) VALUES (?, ?, ?, 0) "
                    "ON CONFLICT (key) DO NOTHING",
                    (key, app, channel),
                )
                cur = c.execute(
                    "UPDATE rollout_node_sets SET n = n + 1 WHERE key = ? AND n < ?",
                    (key, MAX_NODES),
                )
                if cur.rowcount == 0:
                    return "full"
                was: NodeWas = "new"
            else:
                was = "failed" if row[0] else "ok"
            c.execute(
                "INSERT OR REPLACE INTO rollout_nodes (key, node, failed) VALUES (?, ?, ?)",
                (key, node, int(failed)),
            )
        return was

    def drop_rollout_nodes(self, app: str, channel: str, keep: str | None) -> None:
        with self._tx() as c:
            keys = c.execute(
                "SELECT key FROM rollout_node_sets WHERE app = ? AND channel = ? AND key IS NOT ?",
                (app, channel, keep),
            ).fetchall()
            for (key,) in keys:
                c.execute("DELETE FROM rollout_nodes WHERE key = ?", (key,))
                c.execute("DELETE FROM rollout_node_sets WHERE key = ?", (key,))

    def rollouts(self) -> list[Rollout]:
        with self._lock:
            rows = self._conn.execute("SELECT body FROM rollouts ORDER BY app, channel").fetchall()
        return [Rollout.from_json(json.loads(r[0])) for r in rows]

    def put_rollout(self, r: Rollout) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO rollouts (app, channel, body) VALUES (?, ?, ?)",
                (r.app, r.channel, json.dumps(r.to_json())),
            )

    def update_rollout(
        self, app: str, channel: str, fn: Callable[[Rollout], Rollout]
    ) -> tuple[Rollout, Rollout] | None:
        with self._tx() as c:
            row = c.execute(
                "SELECT body FROM rollouts WHERE app = ? AND channel = ?", (app, channel)
            ).fetchone()
            if row is None:
                return None
            before = Rollout.from_json(json.loads(row[0]))
            after = fn(before)
            if after != before:
                c.execute(
                    "UPDATE rollouts SET body = ? WHERE app = ? AND channel = ?",
                    (json.dumps(after.to_json()), app, channel),
                )
        return before, after

    # ---------------------------------------------------------------- audit log

    def audit(self, e: AuditEntry) -> int:
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO audit (at, action, actor, token_id, address, target, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.at, e.action, e.actor, e.token_id, e.address, e.target, json.dumps(e.detail)),
            )
            return int(cur.lastrowid or 0)

    def audit_page(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, at, action, actor, token_id, address, target, detail FROM audit "
                "WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (before if before is not None else 1 << 62, limit),
            ).fetchall()
        return [
            audit_row(r[0], AuditEntry(r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])))
            for r in rows
        ]
