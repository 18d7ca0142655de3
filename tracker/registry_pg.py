"""The release registry in PostgreSQL, for replicas on separate hosts: ``--registry postgresql://``.

Theory of operation
-------------------
The same data and semantics as :class:`tracker.registry_sqlite.SQLiteRegistry` (apps and their
publisher token hashes, signed manifests, channel heads and history), in tables of the same
shape (:data:`tracker.pg.MIGRATIONS`), in one database every replica reaches. Unlike the Redis
registry it keeps every channel move (no history cap) and is durable the way operators already
back up and replicate PostgreSQL.

**Atomic changes.** A change is one transaction that first takes the ``reg_meta`` row lock
(:mod:`tracker.pg`): two replicas publishing the same build at once run one after the other,
and the second sees the first's ``max_build`` and is refused (409) with nothing written.
``seq`` comes from the same row, so it grows in commit order without gaps, as with SQLite.

**Change notification.** The same row's ``version`` moves with every change;
:meth:`PGRegistry.data_version` reads it (one indexed row, ~100 us on loopback) when the app's
watcher polls every ``FEED_POLL`` (0.2 s), so a publish on replica A wakes long-polls on
replica B within ~0.2 s.

**What is served from memory.** As in the Redis registry: found app rows (dropped whenever the
version moves, so a token rotated on another replica stops working there within 0.2 s),
manifest infos and manifests (immutable; an LRU bounded in bytes) are cached per replica, so
token checks, announces and manifest downloads make no round trip once warm; heads, channel
lists and history are read on every call.

**Blocking.** psycopg is used synchronously; ``blocking`` is True, so the app runs calls in a
worker thread, but for the cached ``get_app`` and ``manifest_info``, whose rare misses hold the
event loop for one query (at most the connect timeout when the server is gone). Failures are
:class:`~tracker.errors.RegistryUnavailable` (HTTP 503), with :mod:`tracker.pg`'s breaker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pnode.discovery.tracker_api import ChannelHead

from .backend import AppRow, Publication
from .errors import Conflict
from .lru import LRU
from .pg import Conn, PGDatabase
from .registry_redis import MANIFEST_CACHE_BYTES, MANIFEST_CACHE_ENTRIES, ROW_CACHE_ENTRIES
from .registry_sqlite import read_snapshot

__all__ = ["PGRegistry"]

_HEAD = (
    "SELECT c.channel, c.seq, c.manifest_id, m.build, m.version, e.at FROM channels c "
    "JOIN manifests m ON m.id = c.manifest_id JOIN channel_events e ON e.seq = c.seq "
)


def _app_row(row: tuple[Any, ...]) -> AppRow:
    return AppRow(row[0], bytes(row[1]), bytes(row[2]), float(row[3]))


def _not_newer(app: str, channel: str, build: int, max_build: int) -> Conflict:
    return Conflict(
        f"build {build} of {app} is not newer than build {max_build} already "
        f"published to channel {channel}",
        fix="publish a higher build number, or use promote/rollback for an old one",
    )


class PGRegistry:
    """Apps, manifests and channels in PostgreSQL (a :class:`tracker.backend.RegistryStore`);
    see the module docstring.

    Args:
        db: the database, shared with the replica's :class:`tracker.ops_pg.PGOps`.
    """

    #: calls may wait on the network (but for the cached lookups; see the module docstring)
    blocking = True

    def __init__(self, db: PGDatabase) -> None:
        self.db = db
        self.where = db.where
        self._seen_version = -1
        self._apps = LRU(ROW_CACHE_ENTRIES)
        self._infos = LRU(ROW_CACHE_ENTRIES)
        self._manifests = LRU(MANIFEST_CACHE_ENTRIES, MANIFEST_CACHE_BYTES)

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """The change counter (moves with every change, on any replica). Always tries the
        server, even while the breaker is open: it is the watcher's probe."""
        with self.db.connection("read the registry's version", probe=True) as c:
            row = c.execute("SELECT version FROM reg_meta WHERE id = 1").fetchone()
        v = int(row[0]) if row else 0
        if v != self._seen_version:  # another replica may have rotated a token
            self._seen_version = v
            self._apps.clear()
        return v

    @staticmethod
    def _changing(c: Conn) -> int:
        """Take the registry's write lock (for this transaction) and move the version; the
        last ``seq`` taken."""
        row = c.execute(
            "UPDATE reg_meta SET version = version + 1 WHERE id = 1 RETURNING seq"
        ).fetchone()
        assert row is not None  # the migration inserted it
        return int(row[0])

    # ---------------------------------------------------------------- apps

    def add_app(self, name: str, key: bytes, token_hash: bytes, now: float) -> AppRow:
        with self.db.tx(f"register app {name}") as c:
            self._changing(c)
            cur = c.execute(
                "INSERT INTO apps (name, key, token_hash, created) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, key, token_hash, now),
            )
            if cur.rowcount == 0:
                raise Conflict(f"app {name} is already registered", fix="pick another app name")
        app = AppRow(name, key, token_hash, now)
        self._apps.put(name, app)
        return app

    def get_app(self, name: str) -> AppRow | None:
        app: AppRow | None = self._apps.get(name)
        if app is not None:
            return app
        with self.db.connection(f"read app {name}") as c:
            row = c.execute(
                "SELECT name, key, token_hash, created FROM apps WHERE name = %s", (name,)
            ).fetchone()
        if row is None:
            return None
        app = _app_row(row)
        self._apps.put(name, app)
        return app

    def rotate_token(self, name: str, token_hash: bytes) -> AppRow | None:
        with self.db.tx(f"rotate the token of {name}") as c:
            self._changing(c)
            row = c.execute(
                "UPDATE apps SET token_hash = %s WHERE name = %s "
                "RETURNING name, key, token_hash, created",
                (token_hash, name),
            ).fetchone()
        if row is None:
            return None
        app = _app_row(row)
        self._apps.put(name, app)
        return app

    def add_rotation(self, name: str, old: bytes, signed: bytes, now: float) -> bool:
        with self.db.tx(f"keep a key rotation of {name}") as c:
            self._changing(c)
            cur = c.execute(
                "INSERT INTO key_rotations (app, old, signed, added) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (app, old) DO NOTHING",
                (name, old, signed, now),
            )
            return cur.rowcount == 1

    def rotations(self, name: str) -> list[bytes]:
        with self.db.connection(f"read the key rotations of {name}") as c:
            rows = c.execute(
                "SELECT signed FROM key_rotations WHERE app = %s ORDER BY added, seq", (name,)
            )
            return [bytes(r[0]) for r in rows]

    def list_apps(self) -> list[AppRow]:
        with self.db.connection("list apps") as c:
            rows = c.execute("SELECT name, key, token_hash, created FROM apps ORDER BY name")
            return [_app_row(r) for r in rows]

    # ---------------------------------------------------------------- manifests

    def get_manifest(self, manifest_id: bytes) -> bytes | None:
        raw: bytes | None = self._manifests.get(manifest_id)
        if raw is not None:
            return raw
        with self.db.connection(f"read manifest {manifest_id.hex()}") as c:
            row = c.execute(
                "SELECT signed FROM manifests WHERE id = %s", (manifest_id,), binary=True
            ).fetchone()
        if row is None:
            return None
        raw = bytes(row[0])
        self._manifests.put(manifest_id, raw)
        return raw

    def manifest_info(self, manifest_id: bytes) -> tuple[str, int, str, int] | None:
        """(app, build, version, size) of a stored manifest."""
        info: tuple[str, int, str, int] | None = self._infos.get(manifest_id)
        if info is not None:
            return info
        with self.db.connection(f"read manifest {manifest_id.hex()}") as c:
            row = c.execute(
                "SELECT app, build, version, size FROM manifests WHERE id = %s", (manifest_id,)
            ).fetchone()
        if row is None:
            return None
        info = (row[0], int(row[1]), row[2], int(row[3]))
        self._infos.put(manifest_id, info)
        return info

    def releases(self) -> dict[bytes, tuple[str, int, str]]:
        """manifest id -> (app, build, version), for labelling stats."""
        with self.db.connection("list releases") as c:
            rows = c.execute("SELECT id, app, build, version FROM manifests")
            return {bytes(r[0]): (r[1], int(r[2]), r[3]) for r in rows}

    # ---------------------------------------------------------------- channels

    @staticmethod
    def _head(app: str, row: tuple[Any, ...]) -> ChannelHead:
        channel, seq, mid, build, version, at = row
        return ChannelHead(app, channel, int(seq), bytes(mid), int(build), version, float(at))

    def head(self, app: str, channel: str) -> ChannelHead | None:
        with self.db.connection(f"read channel {channel} of {app}") as c:
            row = c.execute(
                _HEAD + "WHERE c.app = %s AND c.channel = %s", (app, channel)
            ).fetchone()
        return None if row is None else self._head(app, row)

    def channels(self, app: str) -> list[ChannelHead]:
        with self.db.connection(f"list channels of {app}") as c:
            rows = c.execute(_HEAD + "WHERE c.app = %s ORDER BY c.channel", (app,)).fetchall()
        return [self._head(app, r) for r in rows]

    def publish(self, p: Publication) -> int:
        """Store a verified manifest and make it the channel's head; returns the event seq.

        Raises:
            Conflict: the build is not newer than every build ever published to the channel
                (so a rolled-back build number can never come back with other contents), or
                the app is not registered.
            RegistryUnavailable: nothing was published (or all of it was, if the answer was
                lost on the way back: read the head).
        """
        app, channel, build = p.app, p.channel, p.build
        with self.db.tx(f"publish build {build} of {app} to {channel}") as c:
            seq = self._changing(c)
            if c.execute("SELECT 1 FROM apps WHERE name = %s", (app,)).fetchone() is None:
                raise Conflict(f"app {app} is not registered", fix="register it: tracker app add")
            row = c.execute(
                "SELECT max_build FROM channels WHERE app = %s AND channel = %s", (app, channel)
            ).fetchone()
            if row is not None and build <= row[0]:
                raise _not_newer(app, channel, build, int(row[0]))
            c.execute(
                "INSERT INTO manifests (id, app, build, version, size, signed, uploaded) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (p.manifest_id, app, build, p.version, p.size, p.signed, p.now),
            )
            seq = self._move(c, seq, app, channel, p.manifest_id, build, "publish", p.now, p.actor)
        self._manifests.put(p.manifest_id, bytes(p.signed))
        self._infos.put(p.manifest_id, (app, build, p.version, p.size))
        return seq

    def move(
        self, *, app: str, channel: str, manifest_id: bytes, action: str, now: float, actor: str
    ) -> int:
        """Point a channel at an already stored manifest of the app (promote or rollback)."""
        with self.db.tx(f"{action} channel {channel} of {app}") as c:
            seq = self._changing(c)
            row = c.execute(
                "SELECT build FROM manifests WHERE id = %s AND app = %s", (manifest_id, app)
            ).fetchone()
            if row is None:
                raise Conflict(
                    f"manifest {manifest_id.hex()} is not a published build of {app}",
                    fix="publish it first, or pick an id from the channel history",
                )
            return self._move(c, seq, app, channel, manifest_id, int(row[0]), action, now, actor)

    @staticmethod
    def _move(
        c: Conn,
        last_seq: int,
        app: str,
        channel: str,
        manifest_id: bytes,
        build: int,
        action: str,
        now: float,
        actor: str,
    ) -> int:
        """The channel move inside a change's transaction; its seq."""
        seq = last_seq + 1
        c.execute("UPDATE reg_meta SET seq = %s WHERE id = 1", (seq,))
        c.execute(
            "INSERT INTO channel_events (seq, app, channel, manifest_id, action, at, actor) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (seq, app, channel, manifest_id, action, now, actor),
        )
        c.execute(
            "INSERT INTO channels (app, channel, seq, manifest_id, max_build) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (app, channel) DO UPDATE SET "
            "seq = excluded.seq, manifest_id = excluded.manifest_id, "
            "max_build = GREATEST(channels.max_build, excluded.max_build)",
            (app, channel, seq, manifest_id, build),
        )
        return seq

    def history(self, app: str, channel: str, limit: int = 100) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        with self.db.connection(f"read the history of channel {channel} of {app}") as c:
            rows = c.execute(
                "SELECT e.seq, e.manifest_id, e.action, e.at, e.actor, m.build, m.version "
                "FROM channel_events e JOIN manifests m ON m.id = e.manifest_id "
                "WHERE e.app = %s AND e.channel = %s ORDER BY e.seq DESC LIMIT %s",
                (app, channel, limit),
            ).fetchall()
        return [
            {
                "seq": int(r[0]),
                "manifest_id": bytes(r[1]).hex(),
                "action": r[2],
                "at": float(r[3]),
                "actor": r[4],
                "build": int(r[5]),
                "version": r[6],
            }
            for r in rows
        ]

    def previous_head(self, app: str, channel: str) -> bytes | None:
        """The manifest the channel pointed at before its current head (for rollback)."""
        with self.db.connection(f"read the history of channel {channel} of {app}") as c:
            row = c.execute(
                "SELECT e.manifest_id FROM channel_events e JOIN channels c "
                "ON c.app = e.app AND c.channel = e.channel "
                "WHERE e.app = %s AND e.channel = %s AND e.seq < c.seq "
                "AND e.manifest_id <> c.manifest_id ORDER BY e.seq DESC LIMIT 1",
                (app, channel),
            ).fetchone()
        return bytes(row[0]) if row else None

    # ---------------------------------------------------------------- moving from SQLite

    def copy_from_sqlite(
        self, path: Path, ops_path: Path | None = None, traffic_path: Path | None = None
    ) -> dict[str, int]:
        """Copy a SQLite registry (``DIR/registry.db``), and ``DIR/ops.db`` and
        ``DIR/traffic.db`` when given, into this database, which must be empty: apps and token
        hashes, key rotations, manifests, heads, every move and the ``seq`` counter (nodes
        following a channel with ``since=SEQ`` go on after the switch); outcome tallies,
        rollouts and the audit log with its numbers; the traffic series, online hours and
        forecasts. Reads one snapshot of each file; writes everything in one transaction, so a
        failure or a refusal leaves the database as it was.

        Returns:
            counts: apps, manifests, moves, channels, rotations (and outcome_builds, rollouts,
            audit; traffic_builds, traffic_minutes, forecasts).

        Raises:
            Conflict: the database already holds a registry or operations data.
            RegistryUnavailable: PostgreSQL failed; nothing was written.
        """
        from .ops_pg import copy_ops, ops_empty
        from .ops_sqlite import read_ops_snapshot
        from .traffic_pg import copy_traffic, traffic_empty

        snap = read_snapshot(path)
        ops = read_ops_snapshot(ops_path) if ops_path is not None else None
        with self.db.tx("copy the SQLite registry") as c:
            last = self._changing(c)
            if (
                last
                or c.execute("SELECT 1 FROM apps LIMIT 1").fetchone()
                or not ops_empty(c)
                or not traffic_empty(c)
            ):
                raise Conflict(
                    f"the database at {self.where} already holds a tracker's registry",
                    fix="copy into an empty database (createdb), or drop its tables first",
                )
            with c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO apps (name, key, token_hash, created) VALUES (%s, %s, %s, %s)",
                    snap.apps,
                )
                cur.executemany(
                    "INSERT INTO manifests (id, app, build, version, size, signed, uploaded) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    snap.manifests,
                )
                cur.executemany(
                    "INSERT INTO channel_events (seq, app, channel, manifest_id, action, at, "
                    "actor) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    snap.events,
                )
                cur.executemany(
                    "INSERT INTO channels (app, channel, seq, manifest_id, max_build) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    snap.heads,
                )
                cur.executemany(
                    "INSERT INTO key_rotations (app, old, signed, added) VALUES (%s, %s, %s, %s)",
                    snap.rotations,
                )
            c.execute("UPDATE reg_meta SET seq = %s WHERE id = 1", (snap.last_seq,))
            counts = {
                "apps": len(snap.apps),
                "manifests": len(snap.manifests),
                "moves": len(snap.events),
                "channels": len(snap.heads),
                "rotations": len(snap.rotations),
            }
            if ops is not None:
                counts |= copy_ops(c, ops)
            if traffic_path is not None:
                counts |= copy_traffic(c, traffic_path)
        return counts
