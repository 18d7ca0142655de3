"""The release registry in SQLite: ``DIR/registry.db``, the default.

Theory of operation
-------------------
The registry (apps and their publisher keys, manifests, channels and their history) is small,
precious and changes rarely: it lives in ``DIR/registry.db``, SQLite in WAL mode, written in one
transaction per change. Several tracker processes may open the same ``DIR`` (on one host); each
notices the others' writes through ``PRAGMA data_version`` (see
:meth:`SQLiteRegistry.data_version`), which is how the update feed of one replica learns about a
publish made on another. Replicas on separate hosts use :mod:`tracker.registry_pg` (or
:mod:`tracker.registry_redis`).

Every SQL statement is parameterized; names never reach SQL text.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pnode.discovery.tracker_api import ChannelHead

from .backend import AppRow, Publication
from .errors import Conflict

__all__ = ["RegistrySnapshot", "SQLiteFile", "SQLiteRegistry", "connect", "read_snapshot"]

_REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY, key BLOB NOT NULL, token_hash BLOB NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    id BLOB PRIMARY KEY, app TEXT NOT NULL REFERENCES apps(name), build INTEGER NOT NULL,
    version TEXT NOT NULL, size INTEGER NOT NULL, signed BLOB NOT NULL, uploaded REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, channel TEXT NOT NULL,
    manifest_id BLOB NOT NULL REFERENCES manifests(id), action TEXT NOT NULL,
    at REAL NOT NULL, actor TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS channel_events_by_channel ON channel_events(app, channel, seq);
CREATE TABLE IF NOT EXISTS key_rotations (
    app TEXT NOT NULL REFERENCES apps(name), old BLOB NOT NULL, signed BLOB NOT NULL,
    added REAL NOT NULL, PRIMARY KEY (app, old)
);
CREATE TABLE IF NOT EXISTS channels (
    app TEXT NOT NULL, channel TEXT NOT NULL, seq INTEGER NOT NULL,
    manifest_id BLOB NOT NULL REFERENCES manifests(id), max_build INTEGER NOT NULL,
    PRIMARY KEY (app, channel)
);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection for one of the tracker's SQLite files (WAL, usable from any thread)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """One read transaction on a SQLite file opened read-only: a consistent snapshot."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


@dataclass(frozen=True)
class RegistrySnapshot:
    """All of a SQLite registry's rows, as ``tracker registry copy`` moves them (columns in
    the order of the tables' definitions above)."""

    apps: list[tuple[str, bytes, bytes, float]]
    manifests: list[tuple[bytes, str, int, str, int, bytes, float]]
    events: list[tuple[int, str, str, bytes, str, float, str]]  # by seq
    heads: list[tuple[str, str, int, bytes, int]]
    last_seq: int  # the highest seq ever taken (the next move is numbered after it)
    rotations: list[tuple[str, bytes, bytes, float]]  # app, old key, signed, added; oldest first


def read_snapshot(path: Path) -> RegistrySnapshot:
    """Read ``DIR/registry.db`` in one consistent snapshot, without writing to it."""
    with read_only(path) as conn:
        apps = conn.execute("SELECT name, key, token_hash, created FROM apps").fetchall()
        manifests = conn.execute(
            "SELECT id, app, build, version, size, signed, uploaded FROM manifests"
        ).fetchall()
        events = conn.execute(
            "SELECT seq, app, channel, manifest_id, action, at, actor FROM channel_events "
            "ORDER BY seq"
        ).fetchall()
        heads = conn.execute(
            "SELECT app, channel, seq, manifest_id, max_build FROM channels"
        ).fetchall()
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'channel_events'"
        ).fetchone()
        try:
            rotations = conn.execute(
                "SELECT app, old, signed, added FROM key_rotations ORDER BY added, rowid"
            ).fetchall()
        except sqlite3.OperationalError:  # a registry from before key rotation: none
            rotations = []
    last_seq = max([row[0] if row else 0] + [e[0] for e in events])
    return RegistrySnapshot(apps, manifests, events, heads, last_seq, rotations)


class SQLiteFile:
    """One connection to one of the tracker's SQLite files, created with ``schema``.

    A lock serialises use of the one connection, so the app may call its methods from the trio
    thread and from worker threads alike; ``_tx`` is one ``BEGIN IMMEDIATE`` transaction (which
    also serialises the processes sharing the file).
    """

    #: a local file: calls are short and run inline
    blocking = False

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._conn = connect(path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")


class SQLiteRegistry(SQLiteFile):
    """Apps, manifests and channels in SQLite (a :class:`tracker.backend.RegistryStore`).
    Methods are synchronous and fast."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _REGISTRY_SCHEMA)

    def data_version(self) -> int:
        """Changes whenever *another* connection (another replica) commits to the database."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def add_app(self, name: str, key: bytes, token_hash: bytes, now: float) -> AppRow:
        with self._tx() as c:
            if c.execute("SELECT 1 FROM apps WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"app {name} is already registered", fix="pick another app name")
            c.execute(
                "INSERT INTO apps (name, key, token_hash, created) VALUES (?, ?, ?, ?)",
                (name, key, token_hash, now),
            )
        return AppRow(name, key, token_hash, now)

    def get_app(self, name: str) -> AppRow | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT name, key, token_hash, created FROM apps WHERE name = ?", (name,)
            ).fetchone()
        return AppRow(*row) if row else None

    def rotate_token(self, name: str, token_hash: bytes) -> AppRow | None:
        with self._tx() as c:
            c.execute("UPDATE apps SET token_hash = ? WHERE name = ?", (token_hash, name))
        return self.get_app(name)

    def add_rotation(self, name: str, old: bytes, signed: bytes, now: float) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO key_rotations (app, old, signed, added) VALUES (?, ?, ?, ?)",
                (name, old, signed, now),
            )
            return cur.rowcount == 1

    def rotations(self, name: str) -> list[bytes]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT signed FROM key_rotations WHERE app = ? ORDER BY added, rowid", (name,)
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def list_apps(self) -> list[AppRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, key, token_hash, created FROM apps ORDER BY name"
            ).fetchall()
        return [AppRow(*r) for r in rows]

    def get_manifest(self, manifest_id: bytes) -> bytes | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT signed FROM manifests WHERE id = ?", (manifest_id,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def manifest_info(self, manifest_id: bytes) -> tuple[str, int, str, int] | None:
        """(app, build, version, size) of a stored manifest."""
        with self._lock:
            row = self._conn.execute(
                "SELECT app, build, version, size FROM manifests WHERE id = ?", (manifest_id,)
            ).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

    def head(self, app: str, channel: str) -> ChannelHead | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT c.seq, c.manifest_id, m.build, m.version, e.at FROM channels c "
                "JOIN manifests m ON m.id = c.manifest_id "
                "JOIN channel_events e ON e.seq = c.seq "
                "WHERE c.app = ? AND c.channel = ?",
                (app, channel),
            ).fetchone()
        if row is None:
            return None
        return ChannelHead(app, channel, row[0], bytes(row[1]), row[2], row[3], row[4])

    def channels(self, app: str) -> list[ChannelHead]:
        with self._lock:
            names = [
                r[0]
                for r in self._conn.execute(
                    "SELECT channel FROM channels WHERE app = ? ORDER BY channel", (app,)
                )
            ]
        heads = [self.head(app, n) for n in names]
        return [h for h in heads if h is not None]

    def publish(self, p: Publication) -> int:
        """Store a verified manifest and make it the channel's head; returns the event seq.

        Raises:
            Conflict: the build is not newer than every build ever published to the channel
                (so a rolled-back build number can never come back with other contents).
        """
        app, channel, build = p.app, p.channel, p.build
        with self._tx() as c:
            row = c.execute(
                "SELECT max_build FROM channels WHERE app = ? AND channel = ?", (app, channel)
            ).fetchone()
            if row is not None and build <= row[0]:
                raise Conflict(
                    f"build {build} of {app} is not newer than build {row[0]} already "
                    f"published to channel {channel}",
                    fix="publish a higher build number, or use promote/rollback for an old one",
                )
            c.execute(
                "INSERT OR IGNORE INTO manifests (id, app, build, version, size, signed, "
                "uploaded) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (p.manifest_id, app, build, p.version, p.size, p.signed, p.now),
            )
            return self._move(c, app, channel, p.manifest_id, build, "publish", p.now, p.actor)

    def move(
        self, *, app: str, channel: str, manifest_id: bytes, action: str, now: float, actor: str
    ) -> int:
        """Point a channel at an already stored manifest of the app (promote or rollback)."""
        with self._tx() as c:
            row = c.execute(
                "SELECT build FROM manifests WHERE id = ? AND app = ?", (manifest_id, app)
            ).fetchone()
            if row is None:
                raise Conflict(
                    f"manifest {manifest_id.hex()} is not a published build of {app}",
                    fix="publish it first, or pick an id from the channel history",
                )
            return self._move(c, app, channel, manifest_id, row[0], action, now, actor)

    @staticmethod
    def _move(
        c: sqlite3.Connection,
        app: str,
        channel: str,
        manifest_id: bytes,
        build: int,
        action: str,
        now: float,
        actor: str,
    ) -> int:
        cur = c.execute(
            "INSERT INTO channel_events (app, channel, manifest_id, action, at, actor) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (app, channel, manifest_id, action, now, actor),
        )
        seq = int(cur.lastrowid or 0)
        c.execute(
            "INSERT INTO channels (app, channel, seq, manifest_id, max_build) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (app, channel) DO UPDATE SET "
            "seq = excluded.seq, manifest_id = excluded.manifest_id, "
            "max_build = MAX(channels.max_build, excluded.max_build)",
            (app, channel, seq, manifest_id, build),
        )
        return seq

    def history(self, app: str, channel: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT e.seq, e.manifest_id, e.action, e.at, e.actor, m.build, m.version "
                "FROM channel_events e JOIN manifests m ON m.id = e.manifest_id "
                "WHERE e.app = ? AND e.channel = ? ORDER BY e.seq DESC LIMIT ?",
                (app, channel, limit),
            ).fetchall()
        return [
            {
                "seq": r[0],
                "manifest_id": bytes(r[1]).hex(),
                "action": r[2],
                "at": r[3],
                "actor": r[4],
                "build": r[5],
                "version": r[6],
            }
            for r in rows
        ]

    def previous_head(self, app: str, channel: str) -> bytes | None:
        """The manifest the channel pointed at before its current head (for rollback)."""
        head = self.head(app, channel)
        if head is None:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT manifest_id FROM channel_events WHERE app = ? AND channel = ? "
                "AND seq < ? AND manifest_id != ? ORDER BY seq DESC LIMIT 1",
                (app, channel, head.seq, head.manifest_id),
            ).fetchone()
        return bytes(row[0]) if row else None

    def releases(self) -> dict[bytes, tuple[str, int, str]]:
        """manifest id -> (app, build, version), for labelling stats."""
        with self._lock:
            rows = self._conn.execute("SELECT id, app, build, version FROM manifests").fetchall()
        return {bytes(r[0]): (r[1], r[2], r[3]) for r in rows}
