"""Tracker storage: the release registry (SQLite) and the swarm state (SQLite or Redis).

Theory of operation
-------------------
Two kinds of state with different needs live here.

The **registry** (apps and their publisher keys, manifests, channels and their history) is small,
precious and changes rarely: it lives in ``DIR/registry.db``, SQLite in WAL mode, written in one
transaction per change. Several tracker processes may open the same ``DIR`` (on one host); each
notices the others' writes through ``PRAGMA data_version`` (see :meth:`Registry.data_version`),
which is how the update feed of one replica learns about a publish made on another.

The **swarm state** (who is in which swarm, how far along, the per-release counters, peer
quality, replay digests) changes on every announce and is disposable. It sits behind the
:class:`SwarmStore` interface with two implementations:

* :class:`SQLiteSwarm`: one process; the state lives in memory (:class:`tracker.swarm.MemorySwarm`)
  and is written behind to ``DIR/swarm.db`` once a second, in one transaction from a worker
  thread, and read back at start.
* :class:`RedisSwarm`: a redis-server shared by several replicas. Every announce and report is a
  single Lua script (one round trip, atomic), so two replicas can never interleave half-updates
  of the same swarm. redis-py's client is synchronous: the app calls these methods through
  ``trio.to_thread.run_sync``, and sends the announces that arrive meanwhile as one pipelined
  group commit (:meth:`RedisSwarm.announce_many`).

(The opt-in third, :class:`tracker.replicated.LogSwarm`, keeps the state in each replica's memory
and uses Redis only to order the changes; see that module.)

Both compute quality scores with the same formula (:func:`tracker.core.quality_score`; the Lua
copy is checked against it by the tests) and both return live peers unranked; ranking is
:func:`tracker.core.rank_peers`, shared.

Every SQL statement is parameterized; names never reach SQL text.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from p2pnode.discovery.dht.records import PeerRecordError, decode_bundle
from p2pnode.discovery.tracker_api import ChannelHead
from p2pnode.release import keys

from .core import (
    FLAG_REPORTERS,
    RATE_HALF,
    Announce,
    PeerQuality,
    Report,
)
from .errors import Conflict, SwarmUnavailable
from .swarm import (
    ADOPTION_KEEP_S,
    UNKNOWN_SCORE,
    AnnounceAnswer,
    Dirty,
    Member,
    MemorySwarm,
    quality_stats,
    release_stats,
)

__all__ = [
    "AppRow",
    "ChannelHead",
    "RedisSwarm",
    "Registry",
    "SQLiteSwarm",
    "SwarmStore",
]

#: Candidates fetched per swarm before ranking, at most. Redis's script takes the
#: ``numwant + 9`` freshest members of a swarm (room for the announcer and a few flagged peers)
#: and ranks them by score itself, sending back only the answer: with ``2 * numwant + 1`` the
#: script cost redis-server 322 us per announce, with ``numwant + 9`` 239 us (ranking among
#: the freshest announcers is a sample either way in a big swarm).
CANDIDATES_PER_SWARM = 200
#: Other builds of the same app searched for partial seeds (most recently announced first).
PARTIAL_SWARMS = 8


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True, slots=True)
class AppRow:
    name: str
    key: bytes
    token_hash: bytes
    created: float


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
CREATE TABLE IF NOT EXISTS channels (
    app TEXT NOT NULL, channel TEXT NOT NULL, seq INTEGER NOT NULL,
    manifest_id BLOB NOT NULL REFERENCES manifests(id), max_build INTEGER NOT NULL,
    PRIMARY KEY (app, channel)
);
"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Registry:
    """Apps, manifests and channels in SQLite. Methods are synchronous and fast.

    A lock serialises use of the one connection, so the app may call these from the trio thread
    and from worker threads alike.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = _connect(path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_REGISTRY_SCHEMA)

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

    def publish(
        self,
        *,
        app: str,
        channel: str,
        manifest_id: bytes,
        build: int,
        version: str,
        size: int,
        signed: bytes,
        now: float,
        actor: str,
    ) -> int:
        """Store a verified manifest and make it the channel's head; returns the event seq.

        Raises:
            Conflict: the build is not newer than every build ever published to the channel
                (so a rolled-back build number can never come back with other contents).
        """
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
                (manifest_id, app, build, version, size, signed, now),
            )
            return self._move(c, app, channel, manifest_id, build, "publish", now, actor)

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


# --------------------------------------------------------------------------------------------
# Swarm state


class SwarmStore(Protocol):
    """Shared swarm state. Methods are synchronous; Redis ones are called via a worker thread."""

    def announce(
        self,
        a: Announce,
        ip: str,
        record: bytes | None,
        *,
        now: float,
        ttl: float,
        digest: bytes,
        window: float,
    ) -> AnnounceAnswer | None:
        """Apply the announce; return the answer (:class:`AnnounceAnswer`: peers ranked as
        ``core.rank_peers`` specifies and serialised, and the swarm's seeder and leecher
        counts); ``None`` if ``digest`` was already seen (a replay) and nothing changed."""
        ...

    def report(self, r: Report, *, now: float, digest: bytes, window: float) -> bool:
        """Fold a report into peer quality; False if it is a replay (nothing changed)."""
        ...

    def stats(self, now: float) -> dict[str, Any]: ...

    def quality(self, node_id: bytes) -> PeerQuality: ...

    def clear_peer(self, node_id: bytes) -> bool: ...

    def gc(self, now: float) -> int: ...

    def close(self) -> None: ...


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
CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
"""

_release_stats = release_stats
_quality_stats = quality_stats


#: Write-behind batches (one a second) kept while swarm.db cannot be written.
MAX_QUEUED = 120


class SQLiteSwarm(MemorySwarm):
    """Swarm state of a single tracker process: in memory, written behind to ``DIR/swarm.db``.

    Announces and reports change only memory (:class:`tracker.swarm.MemorySwarm`); the tracker
    calls :meth:`flush_batch` every ``FLUSH_INTERVAL`` seconds on its own thread, which queues
    the changed rows, and :meth:`write_queued` from a worker thread, which writes each batch in
    one transaction, so no announce waits for the disk. A batch that cannot be written (a full
    disk) stays queued and is written, in order, once writing works again (at most
    ``MAX_QUEUED`` batches wait; the oldest go: the file only serves restarts, memory stays
    right). On open, the live state (members, counters, quality, replay digests) is read back,
    so a restart keeps its swarms; a crash loses at most the last interval's changes of state
    that is disposable anyway (nodes re-announce every interval).
    """

    def __init__(self, path: Path, *, now: float | None = None) -> None:
        super().__init__(track_dirty=True)
        self._conn = _connect(path)
        self._conn.executescript(_SWARM_SCHEMA)
        self._lock = threading.Lock()
        self._queued: list[Dirty] = []  # batches not written yet, oldest first
        self._load(time.time() if now is None else now)

    def _load(self, now: float) -> None:
        c = self._conn
        for row in c.execute(
            "SELECT manifest, node, app, key, ip, port, size, left, from_peers, from_cdn, "
            "uploaded, expires, record FROM peers WHERE expires > ? ORDER BY expires",
            (now,),
        ):
            mid, node, app, key, ip, port, size, left, fp, fc, up, expires, record = row
            self.apply_member(
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
            self.set_release(bytes(mid), app, (completed, fp, fc, up))
        for mid, minute, n in c.execute("SELECT manifest, minute, completed FROM adoption"):
            self.set_adoption(bytes(mid), minute, n)
        reporters: dict[bytes, list[bytes]] = {}
        for node, reporter in c.execute("SELECT node, reporter FROM corrupt_reports"):
            reporters.setdefault(bytes(node), []).append(bytes(reporter))
        for row in c.execute(
            "SELECT node, mib, failures, corrupt, rate, reports, corrupt_reporters FROM quality"
        ):
            node = bytes(row[0])
            self.set_quality(node, PeerQuality(*row[1:]), reporters.get(node, ()))
        for digest, expires in c.execute(
            "SELECT digest, expires FROM seen WHERE expires > ? ORDER BY expires", (now,)
        ):
            self._seen[bytes(digest)] = expires
            self._seen_order.append((expires, bytes(digest)))
        self.take_dirty()  # what was just read is what the file holds

    def flush_batch(self) -> None:
        """Queue the rows changed since the last call (on the thread that changes the swarm)."""
        self._queued.append(self.take_dirty())
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
                if d.gc_before is not None:
                    now = d.gc_before
                    c.execute("DELETE FROM peers WHERE expires <= ?", (now,))
                    c.execute("DELETE FROM seen WHERE expires <= ?", (now,))
                    c.execute(
                        "DELETE FROM adoption WHERE minute < ?",
                        (int((now - ADOPTION_KEEP_S) // 60),),
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


# --------------------------------------------------------------------------------------------
# Redis

# Keys (prefix P, default "trk:"):
#   P seen:<digest hex>        replay guard, SET NX EX window
#   P sw:<mid hex>             zset node hex -> expiry            (live members of one swarm)
#   P seeds:<mid hex>          zset node hex -> expiry            (the seeders among them)
#   P pi:<mid hex>             hash node hex -> peer JSON         (what peers need to dial)
#   P pj:<mid hex>             hash node hex -> b"<left> <its answer JSON up to the score>"
#   P appm:<app>               zset mid hex -> last announce time (builds of an app being shared)
#   P rel:<mid hex>            hash completed/from_peers/from_cdn/uploaded counters
#   P releases                 hash mid hex -> app
#   P adopt:<mid hex>          hash minute -> completions
#   P q:<node hex>             hash mib/failures/corrupt/rate/reports/cr
#   P qc:<node hex>            set of reporter ids that saw corrupt data
#   P qs                       hash node hex -> score (a flagged node's score is 0)
#   P flagged                  hash node hex -> time flagged
_ANNOUNCE_LUA = """
local P = ARGV[1]
local node, mid, app = ARGV[2], ARGV[3], ARGV[4]
local now, expiry = tonumber(ARGV[5]), tonumber(ARGV[6])
local event = ARGV[7]
local left, fp = tonumber(ARGV[8]), tonumber(ARGV[9])
local fc, up = tonumber(ARGV[10]), tonumber(ARGV[11])
local info = ARGV[12]
local want = tonumber(ARGV[13])
local limit, partial = tonumber(ARGV[14]), tonumber(ARGV[15])
local window = tonumber(ARGV[16])
if not redis.call('SET', P .. 'seen:' .. ARGV[17], '1', 'NX', 'EX', window) then
  return false
end
local sw, seeds, pi = P .. 'sw:' .. mid, P .. 'seeds:' .. mid, P .. 'pi:' .. mid
local rel = P .. 'rel:' .. mid
-- expire a bounded batch of dead members of this swarm
local dead = redis.call('ZRANGEBYSCORE', sw, '-inf', now, 'LIMIT', 0, 100)
local pj = P .. 'pj:' .. mid
for _, d in ipairs(dead) do
  redis.call('ZREM', sw, d); redis.call('ZREM', seeds, d); redis.call('HDEL', pi, d)
  redis.call('HDEL', pj, d)
end
local old = nil
local raw = redis.call('HGET', pi, node)
if raw then old = cjson.decode(raw) end
local ofp, ofc, oup = 0, 0, 0
if old then ofp, ofc, oup = old['fp'], old['fc'], old['up'] end
local completed = 0
if event == 'completed' and (old == nil or old['left'] ~= 0) then completed = 1 end
redis.call('HSET', P .. 'releases', mid, app)
if fp > ofp then redis.call('HINCRBY', rel, 'from_peers', fp - ofp) end
if fc > ofc then redis.call('HINCRBY', rel, 'from_cdn', fc - ofc) end
if up > oup then redis.call('HINCRBY', rel, 'uploaded', up - oup) end
redis.call('HINCRBY', rel, 'completed', completed)
if completed == 1 then
  redis.call('HINCRBY', P .. 'adopt:' .. mid, tostring(math.floor(now / 60)), 1)
end
if event == 'stopped' then
  redis.call('ZREM', sw, node); redis.call('ZREM', seeds, node); redis.call('HDEL', pi, node)
  redis.call('HDEL', pj, node)
else
  local d = cjson.decode(info)
  d['fp'] = math.max(fp, ofp); d['fc'] = math.max(fc, ofc); d['up'] = math.max(up, oup)
  redis.call('HSET', pi, node, cjson.encode(d))
  if tonumber(ARGV[20]) > 0 then
    redis.call('HSET', pj, node, ARGV[18])
  else
    redis.call('HDEL', pj, node)  -- it does not serve: counted, never handed out
  end
  redis.call('ZADD', sw, expiry, node)
  if left == 0 then redis.call('ZADD', seeds, expiry, node) else redis.call('ZREM', seeds, node) end
  redis.call('ZADD', P .. 'appm:' .. app, now, mid)
end
local live = redis.call('ZCOUNT', sw, '(' .. now, '+inf')
local nseeds = redis.call('ZCOUNT', seeds, '(' .. now, '+inf')
local out = {nseeds, live - nseeds}
if want == 0 then return out end
-- Candidates, one per node (its entry in the requested build wins: that swarm is collected
-- first), never the announcer, never a flagged node (score "0"); ranked as core.rank_peers
-- does, and only the answer goes back: fragment and score string per peer.
local unknown = tonumber(ARGV[19])
local seen, cands = {}, {}
local function collect(m)
  local members = redis.call('ZREVRANGEBYSCORE', P .. 'sw:' .. m, '+inf', now, 'LIMIT', 0, limit)
  if #members == 0 then return 0 end
  local infos = redis.call('HMGET', P .. 'pj:' .. m, unpack(members))
  local scores = redis.call('HMGET', P .. 'qs', unpack(members))
  local usable = 0
  for i, n in ipairs(members) do
    local v, s = infos[i], scores[i]
    if v and n ~= node and s ~= '0' then
      usable = usable + 1
      if not seen[n] then
        seen[n] = true
        local sp = string.find(v, ' ', 1, true)
        cands[#cands + 1] = {
          own = (m == mid), score = (s and tonumber(s)) or unknown, raw = s or '',
          left = tonumber(string.sub(v, 1, sp - 1)), node = n, frag = string.sub(v, sp + 1)
        }
      end
    end
  end
  return usable
end
-- the build's own swarm comes first in answers: partial seeds only when it cannot fill one
if collect(mid) < want then
  local others = redis.call('ZREVRANGEBYSCORE', P .. 'appm:' .. app, '+inf', now - 3600,
                            'LIMIT', 0, partial + 1)
  for _, m in ipairs(others) do
    if m ~= mid then collect(m) end
  end
end
table.sort(cands, function(x, y)
  if x.own ~= y.own then return x.own end
  if x.score ~= y.score then return x.score > y.score end
  if x.left ~= y.left then return x.left < y.left end
  return x.node < y.node
end)
for k = 1, math.min(want, #cands) do
  out[#out + 1] = cands[k].frag; out[#out + 1] = cands[k].raw
end
return out
"""

_REPORT_LUA = """
local P = ARGV[1]
local reporter = ARGV[2]
local window = tonumber(ARGV[3])
local flag_at, rate_half = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = ARGV[7]
if not redis.call('SET', P .. 'seen:' .. ARGV[4], '1', 'NX', 'EX', window) then
  return 0
end
local i = 8
while i <= #ARGV do
  local node = ARGV[i]
  local nbytes, rate = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local failures, corrupt = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  i = i + 5
  local q = P .. 'q:' .. node
  local cur = redis.call('HMGET', q, 'mib', 'failures', 'corrupt', 'rate', 'reports', 'cr')
  local mib = (tonumber(cur[1]) or 0) + nbytes / 1048576
  local f = (tonumber(cur[2]) or 0) + failures
  local c = (tonumber(cur[3]) or 0) + corrupt
  local r = tonumber(cur[4]) or 0
  if nbytes > 0 and rate > 0 then
    if r <= 0 then r = rate else r = 0.7 * r + 0.3 * rate end
  end
  local reports = (tonumber(cur[5]) or 0) + 1
  local cr = tonumber(cur[6]) or 0
  if corrupt > 0 and redis.call('SADD', P .. 'qc:' .. node, reporter) == 1 then cr = cr + 1 end
  redis.call('HSET', q, 'mib', tostring(mib), 'failures', f, 'corrupt', c,
             'rate', tostring(r), 'reports', reports, 'cr', cr)
  local score = 0
  if cr >= flag_at then
    redis.call('HSETNX', P .. 'flagged', node, now)
  else
    local rel = (1 + mib) / (2 + mib + f + 16 * c)
    local speed = 0.5
    if r > 0 then speed = r / (r + rate_half) end
    score = 0.7 * rel + 0.3 * speed
  end
  redis.call('HSET', P .. 'qs', node, tostring(score))
end
return 1
"""


def peer_fragment(a: Announce, ip: str, record: bytes | None) -> bytes:
    """A member's object in announce answers (docs/tracker-api.md), rendered once when it
    announces, open at the end for its score, which reports change meanwhile."""
    progress = 1.0 if a.size <= 0 else max(0.0, min(1.0, 1 - a.left / a.size))
    d: dict[str, Any] = {
        "node_id": a.node_id.hex(),
        "key": keys.format_public_key(a.public_key),
        "ip": ip,
        "port": a.port,
        "manifest": a.manifest.hex(),
        "seed": a.left == 0,
        "progress": round(progress, 4),
    }
    if record is not None:
        try:
            d["records"] = [r.hex() for r in decode_bundle(record)]
        except PeerRecordError:
            pass
    return json.dumps(d, separators=(",", ":")).encode()[:-1] + b',"score":'


def _answer(res: Any) -> AnnounceAnswer | None:
    """The script's answer: counts, then (fragment, score string) per peer, already ranked."""
    if res is None:
        return None
    peers = [
        frag + b"%g}" % round(float(score) if score else UNKNOWN_SCORE, 4)
        for frag, score in zip(res[2::2], res[3::2], strict=True)
    ]
    return AnnounceAnswer(peers, int(res[0]), int(res[1]))


_F = TypeVar("_F", bound=Callable[..., Any])


def _redis_errors(method: _F) -> _F:
    """Redis failing becomes a 503 naming the server, never a 500 or a dead tracker."""

    @functools.wraps(method)
    def wrapper(self: RedisSwarm, *args: Any, **kw: Any) -> Any:
        import redis

        try:
            return method(self, *args, **kw)
        except redis.exceptions.RedisError as exc:
            raise SwarmUnavailable(
                f"the swarm store (Redis at {self.where}) failed: {exc}"
            ) from exc

    return wrapper  # type: ignore[return-value]


class RedisSwarm:
    """Swarm state in redis-server, shared by every replica pointed at the same server/prefix.

    Args:
        url: ``redis://host:port/db``.
        prefix: key prefix, so one redis can hold several independent trackers (tests use it).
    """

    def __init__(self, url: str, *, prefix: str = "trk:") -> None:
        import redis

        self.prefix = prefix
        parts = urlsplit(url)
        self.where = (  # for error messages: never the password
            parts.path
            if parts.scheme == "unix"
            else f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"
        )
        self._r: Any = redis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30
        )
        self._announce = self._r.register_script(_ANNOUNCE_LUA)
        self._announce_sha: str | None = None
        self._report = self._r.register_script(_REPORT_LUA)

    @_redis_errors
    def ping(self) -> bool:
        return bool(self._r.ping())

    def close(self) -> None:
        self._r.close()

    @_redis_errors
    def announce(
        self,
        a: Announce,
        ip: str,
        record: bytes | None,
        *,
        now: float,
        ttl: float,
        digest: bytes,
        window: float,
    ) -> AnnounceAnswer | None:
        res = self._announce(
            args=self._announce_args(a, ip, record, now=now, ttl=ttl, digest=digest, window=window)
        )
        return _answer(res)

    @_redis_errors
    def announce_many(
        self, batch: list[tuple[Announce, str, bytes | None, float, float, bytes, float]]
    ) -> list[AnnounceAnswer | None]:
        """Group commit: several announces' scripts in one pipelined round trip (each script
        stays atomic on its own). Items: (announce, ip, record, now, ttl, digest, window)."""
        import redis

        args = [
            self._announce_args(a, ip, record, now=now, ttl=ttl, digest=digest, window=window)
            for a, ip, record, now, ttl, digest, window in batch
        ]
        # EVALSHA directly: redis-py's pipelined Script objects ask SCRIPT EXISTS first, an
        # extra round trip per batch. A restarted server has lost the script: load it again.
        for attempt in (1, 2):
            if self._announce_sha is None:
                self._announce_sha = self._r.script_load(_ANNOUNCE_LUA)
            try:
                with self._r.pipeline(transaction=False) as pipe:
                    for item_args in args:
                        pipe.evalsha(self._announce_sha, 0, *item_args)
                    results = pipe.execute()
                break
            except redis.exceptions.NoScriptError:
                self._announce_sha = None
                if attempt == 2:
                    raise
        return [_answer(res) for res in results]

    def _announce_args(
        self,
        a: Announce,
        ip: str,
        record: bytes | None,
        *,
        now: float,
        ttl: float,
        digest: bytes,
        window: float,
    ) -> list[Any]:
        info = json.dumps(
            {
                "k": a.public_key.hex(),
                "ip": ip,
                "port": a.port,
                "size": a.size,
                "left": a.left,
                "r": record.hex() if record else "",
            },
            separators=(",", ":"),
        )
        return [
            self.prefix,
            a.node_id.hex(),
            a.manifest.hex(),
            a.app,
            repr(now),
            repr(now + ttl),
            a.event,
            a.left,
            a.from_peers,
            a.from_cdn,
            a.uploaded,
            info,
            a.numwant,
            min(CANDIDATES_PER_SWARM, a.numwant + 9),
            PARTIAL_SWARMS,
            max(1, int(window)),
            digest.hex(),
            b"%d " % a.left + peer_fragment(a, ip, record),
            repr(UNKNOWN_SCORE),
            a.port,
        ]

    @_redis_errors
    def report(self, r: Report, *, now: float, digest: bytes, window: float) -> bool:
        args: list[Any] = [
            self.prefix,
            r.node_id.hex(),
            max(1, int(window)),
            digest.hex(),
            FLAG_REPORTERS,
            RATE_HALF,
            repr(now),
        ]
        for e in r.peers:
            args += [e.node_id.hex(), e.bytes, e.rate, e.failures, e.corrupt]
        return bool(self._report(args=args))

    @_redis_errors
    def quality(self, node_id: bytes) -> PeerQuality:
        cur = self._r.hmget(
            self.prefix + "q:" + node_id.hex(),
            "mib",
            "failures",
            "corrupt",
            "rate",
            "reports",
            "cr",
        )
        if cur[0] is None:
            return PeerQuality()
        return PeerQuality(
            mib=float(cur[0]),
            failures=int(cur[1]),
            corrupt=int(cur[2]),
            rate=float(cur[3]),
            reports=int(cur[4]),
            corrupt_reporters=int(cur[5]),
        )

    @_redis_errors
    def clear_peer(self, node_id: bytes) -> bool:
        n = node_id.hex()
        p = self.prefix
        with self._r.pipeline() as pipe:
            pipe.delete(p + "q:" + n, p + "qc:" + n)
            pipe.hdel(p + "qs", n)
            pipe.hdel(p + "flagged", n)
            res = pipe.execute()
        return bool(res[0])

    @_redis_errors
    def gc(self, now: float) -> int:
        """Drop expired members of every swarm (announces also expire their own swarm lazily)."""
        p = self.prefix
        removed = 0
        for mid_b in self._r.hkeys(p + "releases"):
            mid = mid_b.decode()
            dead = self._r.zrangebyscore(p + "sw:" + mid, "-inf", now)
            if dead:
                with self._r.pipeline() as pipe:
                    pipe.zrem(p + "sw:" + mid, *dead)
                    pipe.zrem(p + "seeds:" + mid, *dead)
                    pipe.hdel(p + "pi:" + mid, *dead)
                    pipe.hdel(p + "pj:" + mid, *dead)
                    pipe.execute()
                removed += len(dead)
        return removed

    @_redis_errors
    def stats(self, now: float) -> dict[str, Any]:
        p = self.prefix
        releases = {k.decode(): v.decode() for k, v in self._r.hgetall(p + "releases").items()}
        mids = sorted(releases)
        with self._r.pipeline(transaction=False) as pipe:
            for mid in mids:
                pipe.zcount(p + "sw:" + mid, f"({now}", "+inf")
                pipe.zcount(p + "seeds:" + mid, f"({now}", "+inf")
                pipe.hgetall(p + "rel:" + mid)
                pipe.hgetall(p + "adopt:" + mid)
            res = pipe.execute()
        out = []
        for i, mid in enumerate(mids):
            live, seeders, rel, adopt = res[4 * i : 4 * i + 4]
            counters = {k.decode(): int(v) for k, v in rel.items()}
            curve = sorted([int(k) * 60, int(v)] for k, v in adopt.items())
            m = bytes.fromhex(mid)
            out.append(
                _release_stats(
                    m,
                    releases[mid],
                    seeders,
                    live - seeders,
                    counters.get("completed", 0),
                    counters.get("from_peers", 0),
                    counters.get("from_cdn", 0),
                    counters.get("uploaded", 0),
                    {m: curve},
                )
            )
        scores = [float(v) for v in self._r.hvals(p + "qs")]
        flagged = sorted(k.decode() for k in self._r.hkeys(p + "flagged"))
        return {"releases": out, "quality": _quality_stats(scores, flagged)}


def now() -> float:
    return time.time()
