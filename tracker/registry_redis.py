"""The release registry in Redis, for replicas on separate hosts: ``tracker serve --registry URL``.

Theory of operation
-------------------
The default registry (:class:`tracker.registry_sqlite.SQLiteRegistry`) is SQLite in ``DIR``:
replicas must share that directory, so they share a host. :class:`RedisRegistry` keeps the same
data (apps and their publisher token hashes, signed manifests, channel heads and history) in a
redis-server that every replica reaches, with the same semantics, so replicas may run anywhere
behind a load balancer. It has its own URL because the registry is precious while swarm state is
disposable: point ``--registry`` at a Redis with AOF (``appendonly yes``) and ``--redis`` at a
throwaway one, or at the same server.

**Atomic changes.** Every change is one Lua script, so it applies whole or not at all and two
replicas cannot interleave: a publish checks, in the script, that the build is strictly newer
than every build ever published to the channel (``max_build``, compared as decimal strings, exact
up to the manifest's 2**62 limit where Lua's doubles are not), stores the manifest if it is new,
takes the next global ``seq`` and moves the head. Two replicas publishing the same build at once
both run the check, one after the other inside redis-server: the second sees the first's
``max_build`` and is refused (409). The scripts check everything before their first write, so a
refusal writes nothing.

**Change notification.** Each change also increments one counter (``reg:ver``);
:meth:`RedisRegistry.data_version` reads it. The app's watcher polls it every ``FEED_POLL`` (0.2 s)
exactly as it polls SQLite's ``PRAGMA data_version``, and wakes its long-polls and SSE streams when
it moved: a publish on replica A reaches a node long-polling replica B within ~0.2 s. (The counter
also moves on this replica's own changes, unlike SQLite's: that only adds one spurious wake-up
after a local publish, which the app already woke its waiters for.)

**What is served from memory.** Manifests never change once written and app rows change only
when a publisher token is rotated, so each replica caches them after the first read (and drops
its app rows whenever the change counter moves: another replica's rotation reaches it within
``FEED_POLL``): publisher-token
checks, ``manifest_info`` (asked on a node's first announce of each build; the app keeps the
answer) and ``GET /v1/manifests/ID`` cost no round trip once warm. The manifest cache is an LRU
bounded in bytes and entries. Only found rows are cached: a name or id that is missing now may be
published on another replica a moment later. Heads, channel lists and history are read from
Redis on every call (one round trip, ~100 us on loopback): they change, and a read after a
publish on another replica must see it, as with SQLite.

**Blocking** and **errors**: :mod:`tracker.registry_redis_link` (the clients, the circuit
breaker, what a failure becomes).

Keys (under the prefix, ``trk:`` unless ``--redis-prefix``; app and channel names cannot
contain ``:``)::

    P reg:ver                      counter, moved by every change (the change feed's version)
    P reg:seq                      counter, the global seq of channel moves
    P reg:apps                     hash app -> JSON {"key", "token_hash" (hex), "created"}
    P reg:m:<mid hex>              hash app, build, version, size, uploaded, signed (the bytes)
    P reg:releases                 hash mid hex -> JSON [app, build, version] (stats labels)
    P reg:chs:<app>                set of the app's channel names
    P reg:ch:<app>:<channel>       hash seq, mid, build, version, at, max_build (the head)
    P reg:h:<app>:<channel>        list of JSON events, newest first, at most HISTORY_KEEP
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from p2pnode.discovery.tracker_api import ChannelHead

from .backend import AppRow, Publication
from .errors import Conflict
from .lru import LRU
from .registry_redis_link import RedisLink, _text

__all__ = ["RedisRegistry"]

#: Events kept per channel (the API shows the newest 100; rollback looks back through these).
HISTORY_KEEP = 1000
#: Manifest bytes cached per replica, and entries (a manifest is usually a few KB, at most 64 MiB).
MANIFEST_CACHE_BYTES = 64 << 20
MANIFEST_CACHE_ENTRIES = 4096
#: Apps and manifest infos cached per replica (small rows).
ROW_CACHE_ENTRIES = 65_536


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


# The scripts, beside this module, read once at import. Every change is one script; publish and
# move_to share the helpers of registry_redis_move.lua (prepended).
_MOVE_LUA = _lua("registry_redis_move.lua")
_PUBLISH_LUA = _MOVE_LUA + _lua("registry_redis_publish.lua")
_MOVE_TO_LUA = _MOVE_LUA + _lua("registry_redis_move_to.lua")
_ADD_APP_LUA = _lua("registry_redis_add_app.lua")
_PREVIOUS_LUA = _lua("registry_redis_previous.lua")


class RedisRegistry(RedisLink):
    """Apps, manifests and channels in redis-server, shared by replicas on any host.

    Same interface (:class:`tracker.backend.RegistryStore`) and semantics as
    :class:`tracker.registry_sqlite.SQLiteRegistry`; see the module docstring. Its clients and
    circuit breaker are :class:`~tracker.registry_redis_link.RedisLink`'s.

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS).
        prefix: key prefix, so one Redis can hold several trackers (and the swarm state).

    Raises (every method):
        RegistryUnavailable: Redis could not be reached or refused the command (HTTP 503).
    """

    #: calls may wait on the network: the app runs them in a worker thread (but for the
    #: cached ``get_app`` and ``manifest_info``; see the module docstring)
    blocking = True

    def __init__(self, url: str, *, prefix: str = "trk:") -> None:
        super().__init__(url)
        self.p = prefix + "reg:"
        self._publish = self._slow.register_script(_PUBLISH_LUA)
        self._move_to = self._slow.register_script(_MOVE_TO_LUA)
        self._add_app = self._slow.register_script(_ADD_APP_LUA)
        self._previous = self._fast.register_script(_PREVIOUS_LUA)
        self._seen_version = -1
        self._apps = LRU(ROW_CACHE_ENTRIES)
        self._rotations = LRU(ROW_CACHE_ENTRIES)
        self._infos = LRU(ROW_CACHE_ENTRIES)
        self._manifests = LRU(MANIFEST_CACHE_ENTRIES, MANIFEST_CACHE_BYTES)

    # ---------------------------------------------------------------- change feed

    def data_version(self) -> int:
        """The change counter (moves with every change, on any replica). Always tries Redis,
        even while the breaker is open: it is the watcher's probe."""
        with self._redis("read the registry's version", probe=True):
            v = int(self._fast.get(self.p + "ver") or 0)
        if v != self._seen_version:  # another replica may have rotated a token
            self._seen_version = v
            self._apps.clear()
            self._rotations.clear()
        return v

    # ---------------------------------------------------------------- apps

    def add_app(self, name: str, key: bytes, token_hash: bytes, now: float) -> AppRow:
        row = json.dumps({"key": key.hex(), "token_hash": token_hash.hex(), "created": now})
        with self._redis(f"register app {name}"):
            added = self._add_app(keys=[self.p + "apps", self.p + "ver"], args=[name, row])
        if not added:
            raise Conflict(f"app {name} is already registered", fix="pick another app name")
        app = AppRow(name, key, token_hash, now)
        self._apps.put(name, app)
        return app

    @staticmethod
    def _app(name: str, raw: Any) -> AppRow:
        d = json.loads(raw)
        return AppRow(
            name, bytes.fromhex(d["key"]), bytes.fromhex(d["token_hash"]), float(d["created"])
        )

    def get_app(self, name: str) -> AppRow | None:
        app: AppRow | None = self._apps.get(name)
        if app is not None:
            return app
        with self._redis(f"read app {name}"):
            raw = self._fast.hget(self.p + "apps", name)
        if raw is None:
            return None
        app = self._app(name, raw)
        self._apps.put(name, app)
        return app

    def rotate_token(self, name: str, token_hash: bytes) -> AppRow | None:
        import redis

        with self._redis(f"rotate the token of {name}"), self._slow.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.p + "apps")
                    raw = pipe.hget(self.p + "apps", name)
                    if raw is None:
                        return None
                    row = json.loads(raw) | {"token_hash": token_hash.hex()}
                    pipe.multi()
                    pipe.hset(self.p + "apps", name, json.dumps(row))
                    pipe.incr(self.p + "ver")
                    pipe.execute()
                    break
                except redis.exceptions.WatchError:
                    continue
        app = self._app(name, json.dumps(row))
        self._apps.put(name, app)
        return app

    def add_rotation(self, name: str, old: bytes, signed: bytes, now: float) -> bool:
        """One hash per app, old key -> statement: HSETNX keeps the first by each key (the
        order of the rest does not matter to rotation.follow, which chains them itself). The
        change counter moves, so other replicas drop their cached rotations."""
        with self._redis(f"keep a key rotation of {name}"), self._slow.pipeline() as pipe:
            pipe.hsetnx(f"{self.p}rot:{name}", old.hex(), signed)
            pipe.incr(self.p + "ver")
            added = bool(pipe.execute()[0])
        self._rotations.clear()
        return added

    def rotations(self, name: str) -> list[bytes]:
        """Cached like app rows: a publish reads them, and costs no round trip once warm."""
        kept: list[bytes] | None = self._rotations.get(name)
        if kept is None:
            with self._redis(f"read the key rotations of {name}"):
                kept = [bytes(v) for v in self._fast.hvals(f"{self.p}rot:{name}")]
            self._rotations.put(name, kept)
        return kept

    def list_apps(self) -> list[AppRow]:
        with self._redis("list apps"):
            rows = self._fast.hgetall(self.p + "apps")
        return sorted((self._app(_text(k), v) for k, v in rows.items()), key=lambda a: a.name)

    # ---------------------------------------------------------------- manifests

    def get_manifest(self, manifest_id: bytes) -> bytes | None:
        raw: bytes | None = self._manifests.get(manifest_id)
        if raw is not None:
            return raw
        with self._redis(f"read manifest {manifest_id.hex()}"):
            raw = self._slow.hget(self.p + "m:" + manifest_id.hex(), "signed")
        if raw is None:
            return None
        raw = bytes(raw)
        self._manifests.put(manifest_id, raw)
        return raw

    def manifest_info(self, manifest_id: bytes) -> tuple[str, int, str, int] | None:
        """(app, build, version, size) of a stored manifest."""
        info: tuple[str, int, str, int] | None = self._infos.get(manifest_id)
        if info is not None:
            return info
        with self._redis(f"read manifest {manifest_id.hex()}"):
            row = self._fast.hmget(
                self.p + "m:" + manifest_id.hex(), "app", "build", "version", "size"
            )
        if row[0] is None:
            return None
        info = (_text(row[0]), int(row[1]), _text(row[2]), int(row[3]))
        self._infos.put(manifest_id, info)
        return info

    def releases(self) -> dict[bytes, tuple[str, int, str]]:
        """manifest id -> (app, build, version), for labelling stats."""
        with self._redis("list releases"):
            rows = self._fast.hgetall(self.p + "releases")
        out = {}
        for k, v in rows.items():
            app, build, version = json.loads(v)
            out[bytes.fromhex(_text(k))] = (app, int(build), version)
        return out

    # ---------------------------------------------------------------- channels

    def _channel_keys(self, app: str, channel: str, manifest_id: bytes) -> list[str]:
        p = self.p
        return [
            p + "apps",
            f"{p}ch:{app}:{channel}",
            f"{p}chs:{app}",
            f"{p}h:{app}:{channel}",
            p + "m:" + manifest_id.hex(),
            p + "releases",
            p + "seq",
            p + "ver",
        ]

    @staticmethod
    def _head(app: str, channel: str, row: list[Any]) -> ChannelHead | None:
        if row[0] is None:
            return None
        seq, mid, build, version, at = row
        return ChannelHead(
            app, channel, int(seq), bytes.fromhex(_text(mid)), int(build), _text(version), float(at)
        )

    _HEAD_FIELDS = ("seq", "mid", "build", "version", "at")

    def head(self, app: str, channel: str) -> ChannelHead | None:
        with self._redis(f"read channel {channel} of {app}"):
            row = self._fast.hmget(f"{self.p}ch:{app}:{channel}", *self._HEAD_FIELDS)
        return self._head(app, channel, row)

    def channels(self, app: str) -> list[ChannelHead]:
        with self._redis(f"list channels of {app}"):
            names = sorted(_text(n) for n in self._fast.smembers(f"{self.p}chs:{app}"))
            with self._fast.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hmget(f"{self.p}ch:{app}:{n}", *self._HEAD_FIELDS)
                rows = pipe.execute()
        heads = [self._head(app, n, row) for n, row in zip(names, rows, strict=True)]
        return [h for h in heads if h is not None]

    def publish(self, p: Publication) -> int:
        """Store a verified manifest and make it the channel's head; returns the event seq.

        Raises:
            Conflict: the build is not newer than every build ever published to the channel
                (so a rolled-back build number can never come back with other contents), or
                the app is not registered.
            RegistryUnavailable: nothing was published (or all of it was, if the answer was
                lost on the way back: read the head).
        """
        app, channel, build, version = p.app, p.channel, p.build, p.version
        manifest_id, mid = p.manifest_id, p.manifest_id.hex()
        label = json.dumps([app, build, version])
        with self._redis(f"publish build {build} of {app} to {channel}"):
            res = self._publish(
                keys=self._channel_keys(app, channel, manifest_id),
                args=[app, channel, mid, str(build), version, p.size, p.signed, repr(p.now),
                      p.actor, HISTORY_KEEP, label],
            )  # fmt: skip
        status = _text(res[0])
        if status == "old":
            raise Conflict(
                f"build {build} of {app} is not newer than build {_text(res[1])} already "
                f"published to channel {channel}",
                fix="publish a higher build number, or use promote/rollback for an old one",
            )
        if status == "noapp":
            raise Conflict(f"app {app} is not registered", fix="register it: tracker app add")
        self._manifests.put(manifest_id, bytes(p.signed))
        self._infos.put(manifest_id, (app, build, version, p.size))
        return int(res[1])

    def move(
        self, *, app: str, channel: str, manifest_id: bytes, action: str, now: float, actor: str
    ) -> int:
        """Point a channel at an already stored manifest of the app (promote or rollback)."""
        with self._redis(f"{action} channel {channel} of {app}"):
            res = self._move_to(
                keys=self._channel_keys(app, channel, manifest_id),
                args=[app, channel, manifest_id.hex(), action, repr(now), actor, HISTORY_KEEP],
            )
        if _text(res[0]) != "ok":
            raise Conflict(
                f"manifest {manifest_id.hex()} is not a published build of {app}",
                fix="publish it first, or pick an id from the channel history",
            )
        return int(res[1])

    def history(self, app: str, channel: str, limit: int = 100) -> list[dict[str, Any]]:
        """The channel's moves, newest first (the newest ``HISTORY_KEEP`` are kept)."""
        if limit <= 0:
            return []
        with self._redis(f"read the history of channel {channel} of {app}"):
            rows = self._fast.lrange(f"{self.p}h:{app}:{channel}", 0, limit - 1)
        out = []
        for raw in rows:
            e = json.loads(raw)
            out.append(
                {
                    "seq": int(e["seq"]),
                    "manifest_id": e["manifest_id"],
                    "action": e["action"],
                    "at": float(e["at"]),
                    "actor": e["actor"],
                    "build": int(e["build"]),
                    "version": e["version"],
                }
            )
        return out

    def copy_from_sqlite(self, path: Path) -> dict[str, int]:
        """Copy a SQLite registry (``DIR/registry.db``) into this one, which must be empty:
        apps and token hashes, key rotations, manifests, heads, history (the newest
        ``HISTORY_KEEP`` per channel) and the ``seq`` counter, so nodes that follow a channel
        with ``since=SEQ`` go on after the switch. Reads one consistent snapshot; writes in one
        MULTI/EXEC.

        Returns:
            counts: apps, manifests, moves, channels, rotations.

        Raises:
            Conflict: this registry is not empty (or a replica wrote to it meanwhile).
            RegistryUnavailable: Redis failed; nothing was written.
        """
        from .registry_redis_copy import copy_sqlite_registry

        return copy_sqlite_registry(self, path)

    def previous_head(self, app: str, channel: str) -> bytes | None:
        """The manifest the channel pointed at before its current head (for rollback)."""
        with self._redis(f"read the history of channel {channel} of {app}"):
            mid = self._previous(keys=[f"{self.p}ch:{app}:{channel}", f"{self.p}h:{app}:{channel}"])
        return bytes.fromhex(_text(mid)) if mid else None
