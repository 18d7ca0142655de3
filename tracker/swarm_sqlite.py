"""Swarm state of one tracker process: memory, written behind to ``DIR/swarm.db`` (SQLite).

The default store when the tracker runs without ``--redis``. The state and every answer come
from :class:`tracker.swarm.MemorySwarm`; this module adds the file (:class:`SwarmFile`: read
back at start, changes written once a second in one transaction) and the async shell the app
calls (:class:`SQLiteSwarm`). Every SQL statement is parameterized.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import trio

from .backend import AnnounceAnswer, AnnounceCommit, ReportCommit
from .quality import PeerQuality
from .registry_sqlite import connect
from .swarm import ADOPTION_KEEP_S, MemorySwarm
from .swarm_members import Dirty, Member
from .troubles import Troubles

__all__ = ["FLUSH_INTERVAL", "MAX_QUEUED", "SQLiteSwarm", "SwarmFile"]

#: How often the swarm's in-memory changes are written behind (seconds).
FLUSH_INTERVAL = 1.0

_SWARM_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    manifest BLOB NOT NULL, node BLOB NOT NULL, app TEXT NOT NULL, key BLOB NOT NULL,
    ip TEXT NOT NULL, port INTEGER NOT NULL, size INTEGER NOT NULL, left INTEGER NOT NULL,
    from_peers INTEGER NOT NULL, from_cdn INTEGER NOT NULL, uploaded INTEGER NOT NULL,
    expires REAL NOT NULL, record BLOB, PRIMARY KEY (manifest, node)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peers_by_app ON peers(app, expires);
CREATE INDEX IF NOT EXISTS peers_by_expiry ON peers(expires);
CREATE TABLE IF NOT EXISTS releases (
    manifest BLOB PRIMARY KEY, app TEXT NOT NULL, completed INTEGER NOT NULL DEFAULT 0,
    from_peers INTEGER NOT NULL DEFAULT 0, from_cdn INTEGER NOT NULL DEFAULT 0,
    uploaded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS adoption (
    manifest BLOB NOT NULL, minute INTEGER NOT NULL, completed INTEGER NOT NULL,
    PRIMARY KEY (manifest, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quality (
    node BLOB PRIMARY KEY, mib REAL NOT NULL, failures INTEGER NOT NULL, corrupt INTEGER NOT NULL,
    rate REAL NOT NULL, reports INTEGER NOT NULL, corrupt_reporters INTEGER NOT NULL,
    score REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS corrupt_reports (
    node BLOB NOT NULL, reporter BLOB NOT NULL, PRIMARY KEY (node, reporter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS completions (
    manifest BLOB NOT NULL, node BLOB NOT NULL, at REAL NOT NULL, PRIMARY KEY (manifest, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
"""

#: Write-behind batches (one a second) kept while swarm.db cannot be written.
MAX_QUEUED = 120


class SwarmFile:
    """The write-behind of one :class:`~tracker.swarm.MemorySwarm` (made with
    ``track_dirty=True``) to ``DIR/swarm.db``; synchronous (see :class:`SQLiteSwarm`).

    :meth:`flush_batch` (on the thread that changes the swarm) queues the changed rows and
    :meth:`write_queued` (from a worker thread) writes each batch in one transaction. A batch
    that cannot be written (a full disk) stays queued and is written, in order, once writing
    works again (at most ``MAX_QUEUED`` batches wait; the oldest go: the file only serves
    restarts, memory stays right). On open, the live state (members, counters, quality, replay
    digests) is read back into the swarm.
    """

    def __init__(self, path: Path, state: MemorySwarm, *, now: float | None = None) -> None:
        self.state = state
        self._conn = connect(path)
        self._conn.executescript(_SWARM_SCHEMA)
        self._lock = threading.Lock()
        self._queued: list[Dirty] = []  # batches not written yet, oldest first
        self._load(time.time() if now is None else now)

    def _load(self, now: float) -> None:
        c, s = self._conn, self.state
        for row in c.execute(
            "SELECT manifest, node, app, key, ip, port, size, left, from_peers, from_cdn, "
            "uploaded, expires, record FROM peers WHERE expires > ? ORDER BY expires",
            (now,),
        ):
            mid, node, app, key, ip, port, size, left, fp, fc, up, expires, record = row
            s.apply_member(
                Member(
                    bytes(mid),
                    bytes(node),
                    app,
                    bytes(key),
                    ip,
                    port,
                    size,
                    left,
                    fp,
                    fc,
                    up,
                    expires,
                    bytes(record) if record is not None else None,
                ),
                now,
            )
        for mid, app, completed, fp, fc, up in c.execute(
            "SELECT manifest, app, completed, from_peers, from_cdn, uploaded FROM releases"
        ):
            s.set_release(bytes(mid), app, (completed, fp, fc, up))
        for mid, minute, n in c.execute("SELECT manifest, minute, completed FROM adoption"):
            s.set_adoption(bytes(mid), minute, n)
        for mid, node, at in c.execute("SELECT manifest, node, at FROM completions"):
            s.restore_completion(bytes(mid), bytes(node), at)
        reporters: dict[bytes, list[bytes]] = {}
        for node, reporter in c.execute("SELECT node, reporter FROM corrupt_reports"):
            reporters.setdefault(bytes(node), []).append(bytes(reporter))
        for row in c.execute(
            "SELECT node, mib, failures, corrupt, rate, reports, corrupt_reporters FROM quality"
        ):
            node = bytes(row[0])
            s.set_quality(node, PeerQuality(*row[1:]), reporters.get(node, ()))
        s.restore_seen(
            (bytes(digest), expires)
            for digest, expires in c.execute(
                "SELECT digest, expires FROM seen WHERE expires > ? ORDER BY expires", (now,)
            )
        )
        s.take_dirty()  # what was just read is what the file holds

    def flush_batch(self) -> None:
        """Queue the rows changed since the last call (on the thread that changes the swarm)."""
        self._queued.append(self.state.take_dirty())
        del self._queued[:-MAX_QUEUED]

    def write_queued(self) -> None:
        """Write the queued batches in order (may run in a worker thread, never two at once).
        Raises what the write raised (``sqlite3.Error``, ``OSError``), keeping the batches not
        written for the next call."""
        while self._queued:
            self.write(self._queued[0])
            self._queued.pop(0)

    def write(self, d: Dirty) -> None:
        """Write a batch in one transaction (may run in a worker thread)."""
        if not len(d):
            return
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("DELETE FROM peers WHERE manifest = ? AND node = ?", d.peers_delete)
                c.executemany(
                    "INSERT OR REPLACE INTO peers (manifest, node, app, key, ip, port, size, "
                    "left, from_peers, from_cdn, uploaded, expires, record) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    d.peers_upsert,
                )
                c.executemany(
                    "INSERT OR REPLACE INTO releases (manifest, app, completed, from_peers, "
                    "from_cdn, uploaded) VALUES (?, ?, ?, ?, ?, ?)",
                    d.releases,
                )
                c.executemany(
                    "INSERT OR REPLACE INTO adoption (manifest, minute, completed) "
                    "VALUES (?, ?, ?)",
                    d.adoption,
                )
                gone = [(n,) for n in d.quality_delete]
                c.executemany("DELETE FROM quality WHERE node = ?", gone)
                c.executemany("DELETE FROM corrupt_reports WHERE node = ?", gone)
                c.executemany(
                    "INSERT OR REPLACE INTO quality (node, mib, failures, corrupt, rate, "
                    "reports, corrupt_reporters, score) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    d.quality_upsert,
                )
                c.executemany(
                    "INSERT OR IGNORE INTO corrupt_reports (node, reporter) VALUES (?, ?)",
                    d.corrupt,
                )
                c.executemany("INSERT OR IGNORE INTO seen (digest, expires) VALUES (?, ?)", d.seen)
                c.executemany(
                    "INSERT OR IGNORE INTO completions (manifest, node, at) VALUES (?, ?, ?)",
                    d.done,
                )
                if d.gc_before is not None:
                    now = d.gc_before
                    c.execute("DELETE FROM peers WHERE expires <= ?", (now,))
                    c.execute("DELETE FROM seen WHERE expires <= ?", (now,))
                    c.execute(
                        "DELETE FROM adoption WHERE minute < ?",
                        (int((now - ADOPTION_KEEP_S) // 60),),
                    )
                    c.execute(  # as MemorySwarm.gc: a build's set goes after its last one
                        "DELETE FROM completions WHERE manifest IN (SELECT manifest FROM "
                        "completions GROUP BY manifest HAVING max(at) < ?)",
                        (now - ADOPTION_KEEP_S,),
                    )
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def flush(self) -> None:
        """Write every pending change now, on this thread."""
        self.flush_batch()
        self.write_queued()

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()


class SQLiteSwarm:
    """Swarm state of a single tracker process: in memory, written behind to ``DIR/swarm.db``
    (a :class:`tracker.backend.SwarmStore`).

    Announces and reports change only memory (:class:`tracker.swarm.MemorySwarm`), inline on
    the trio thread; :meth:`run` writes the changes behind every ``FLUSH_INTERVAL`` seconds from
    a worker thread (:class:`SwarmFile`), so no announce waits for the disk. A restart keeps
    its swarms; a crash loses at most the last interval's changes of state that is disposable
    anyway (nodes re-announce every interval).
    """

    def __init__(
        self, path: Path, *, now: float | None = None, troubles: Troubles | None = None
    ) -> None:
        self.state = MemorySwarm(track_dirty=True)
        self.file = SwarmFile(path, self.state, now=now)
        self.troubles = troubles or Troubles()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write behind every ``FLUSH_INTERVAL`` seconds, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self.write_behind()

    async def write_behind(self) -> None:
        """Queue what changed and write the queue; a failing write (a full disk) is said once,
        and its batches wait until it works again (``SwarmFile.write_queued``)."""
        self.file.flush_batch()
        try:
            await trio.to_thread.run_sync(self.file.write_queued)
        except (sqlite3.Error, OSError) as exc:
            self.troubles.report("swarm.db", f"writing swarm.db failed: {exc}")
            return
        self.troubles.report("swarm.db", None)

    async def announce(self, c: AnnounceCommit) -> AnnounceAnswer | None:
        return self.state.announce(c)

    async def report(self, c: ReportCommit) -> bool:
        return self.state.report(c)

    async def quality(self, node_id: bytes) -> PeerQuality:
        return self.state.quality(node_id)

    async def clear_peer(self, node_id: bytes) -> bool:
        return self.state.clear_peer(node_id)

    async def gc(self, now: float) -> int:
        return self.state.gc(now)

    async def stats(self, now: float) -> dict[str, Any]:
        return self.state.stats(now)

    async def check(self) -> None:
        """A local file: nothing to reach (a failing write-behind is logged, not fatal)."""

    def close(self) -> None:
        self.file.close()
