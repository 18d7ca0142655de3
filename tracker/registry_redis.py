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

**Blocking.** redis-py is synchronous. The app runs every call that may reach Redis from a
request handler (writes, which carry manifests of up to 64 MiB; heads, channel lists, history,
the app list, release labels and manifest reads) in a worker thread
(``RedisRegistry.blocking``); only the cached lookups (``get_app``, ``manifest_info``,
asked synchronously by token checks and announces) run inline, and on a miss their client's
short timeouts hold the event loop for at most ``FAST_TIMEOUT``. After a failure to reach Redis
every call fails at once for ``DOWN_BACKOFF`` (a circuit breaker: requests do not each wait out
a timeout against a dead host) until a :meth:`~RedisRegistry.data_version` probe, which the
watcher makes every 0.2 s from a worker thread, gets through again.

**Errors.** Any Redis failure becomes :class:`RegistryUnavailable` (HTTP 503, JSON
``registry_unavailable``, naming the server and the cause). A change that fails this way was
either applied whole or not at all; if the connection dropped after Redis ran the script, a
retried publish is refused with 409 (the build is already there): read the channel's head.

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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from p2pnode.discovery.tracker_api import ChannelHead

from .backend import AppRow, Publication
from .errors import Conflict, RegistryUnavailable
from .lru import LRU

__all__ = ["RedisRegistry"]

#: Events kept per channel (the API shows the newest 100; rollback looks back through these).
HISTORY_KEEP = 1000
#: Manifest bytes cached per replica, and entries (a manifest is usually a few KB, at most 64 MiB).
MANIFEST_CACHE_BYTES = 64 << 20
MANIFEST_CACHE_ENTRIES = 4096
#: Apps and manifest infos cached per replica (small rows).
ROW_CACHE_ENTRIES = 65_536
#: Seconds every call fails at once after Redis could not be reached (unless a probe succeeds).
DOWN_BACKOFF = 1.0
#: Connect timeout, and the read timeout of calls made on the event loop (small reads).
FAST_TIMEOUT = 1.0
#: Read timeout of calls made from worker threads (writes carrying up to 64 MiB; manifest reads).
SLOW_TIMEOUT = 10.0


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


# The scripts, beside this module, read once at import. Every change is one script; publish and
# move_to share the helpers of registry_redis_move.lua (prepended).
_MOVE_LUA = _lua("registry_redis_move.lua")
_PUBLISH_LUA = _MOVE_LUA + _lua("registry_redis_publish.lua")
_MOVE_TO_LUA = _MOVE_LUA + _lua("registry_redis_move_to.lua")
_ADD_APP_LUA = _lua("registry_redis_add_app.lua")
_PREVIOUS_LUA = _lua("registry_redis_previous.lua")


def _where(url: str) -> str:
    """``host:port/db`` of a Redis URL, for messages (never the password)."""
    parts = urlsplit(url)
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisRegistry:
    """Apps, manifests and channels in redis-server, shared by replicas on any host.

    Same interface (:class:`tracker.backend.RegistryStore`) and semantics as
    :class:`tracker.registry_sqlite.SQLiteRegistry`; see the module docstring.

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
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.where = _where(url)
        self.p = prefix + "reg:"

        def client(timeout: float) -> Any:
            # One retry on a fresh connection (a pooled one may be dead after a Redis restart);
            # redis-py's default (10 retries with backoff) would hold a request for seconds.
            return redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=FAST_TIMEOUT,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 1),
            )

        self._fast: Any = client(FAST_TIMEOUT)
        self._slow: Any = client(SLOW_TIMEOUT)
        self._publish = self._slow.register_script(_PUBLISH_LUA)
        self._move_to = self._slow.register_script(_MOVE_TO_LUA)
        self._add_app = self._slow.register_script(_ADD_APP_LUA)
        self._previous = self._fast.register_script(_PREVIOUS_LUA)
        self._down_until = 0.0
        self._seen_version = -1
        self._apps = LRU(ROW_CACHE_ENTRIES)
        self._rotations = LRU(ROW_CACHE_ENTRIES)
        self._infos = LRU(ROW_CACHE_ENTRIES)
        self._manifests = LRU(MANIFEST_CACHE_ENTRIES, MANIFEST_CACHE_BYTES)

    def close(self) -> None:
        self._fast.close()
        self._slow.close()

    @contextmanager
    def _redis(self, what: str, *, probe: bool = False) -> Iterator[None]:
        """Translate redis-py's errors into :class:`RegistryUnavailable`; the circuit breaker.

        ``probe``: try even while the breaker is open (and close it on success).
        """
        import redis

        if not probe and time.monotonic() < self._down_until:
            raise RegistryUnavailable(
                f"cannot {what}: the registry's redis at {self.where} was unreachable "
                f"within the last {DOWN_BACKOFF:g} s"
            )
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._down_until = time.monotonic() + DOWN_BACKOFF
            raise RegistryUnavailable(
                f"cannot {what}: the registry's redis at {self.where} is unreachable ({exc})"
            ) from exc
        except redis.exceptions.RedisError as exc:  # e.g. READONLY, MISCONF, OOM, NOAUTH
            raise RegistryUnavailable(
                f"cannot {what}: the registry's redis at {self.where} refused: {exc}"
            ) from exc
        if probe:
            self._down_until = 0.0

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
        import redis

        from .registry_sqlite import read_snapshot

        snap = read_snapshot(path)
        apps, manifests, events, heads = snap.apps, snap.manifests, snap.events, snap.heads
        last_seq = snap.last_seq
        info = {bytes(m[0]): (m[2], m[3]) for m in manifests}
        at_of = {e[0]: e[5] for e in events}
        p = self.p
        guarded = [p + "ver", p + "seq", p + "apps"]
        with self._redis("copy the SQLite registry"), self._slow.pipeline() as pipe:
            try:
                pipe.watch(*guarded)
                if pipe.exists(*guarded):
                    raise Conflict(
                        f"the registry in redis at {self.where} (prefix {p}) is not empty",
                        fix="copy into an empty redis database or another --redis-prefix",
                    )
                pipe.multi()
                for name, app_key, token_hash, created in apps:
                    pipe.hset(p + "apps", name, json.dumps(
                        {"key": bytes(app_key).hex(), "token_hash": bytes(token_hash).hex(),
                         "created": created}))  # fmt: skip
                for mid, app, build, version, size, signed, uploaded in manifests:
                    h = bytes(mid).hex()
                    pipe.hset(p + "m:" + h, mapping={
                        "app": app, "build": str(build), "version": version, "size": size,
                        "signed": bytes(signed), "uploaded": repr(uploaded)})  # fmt: skip
                    pipe.hset(p + "releases", h, json.dumps([app, build, version]))
                for seq, app, channel, mid, action, at, actor in events:
                    build, version = info[bytes(mid)]
                    key = f"{p}h:{app}:{channel}"
                    pipe.lpush(key, json.dumps(
                        {"seq": seq, "manifest_id": bytes(mid).hex(), "action": action,
                         "at": repr(at), "actor": actor, "build": str(build),
                         "version": version}))  # fmt: skip
                    pipe.ltrim(key, 0, HISTORY_KEEP - 1)
                for app, channel, seq, mid, max_build in heads:
                    build, version = info[bytes(mid)]
                    pipe.hset(f"{p}ch:{app}:{channel}", mapping={
                        "seq": seq, "mid": bytes(mid).hex(), "build": str(build),
                        "version": version, "at": repr(at_of[seq]),
                        "max_build": str(max_build)})  # fmt: skip
                    pipe.sadd(f"{p}chs:{app}", channel)
                for app, old, signed, _added in snap.rotations:
                    pipe.hsetnx(f"{p}rot:{app}", bytes(old).hex(), bytes(signed))
                pipe.set(p + "seq", last_seq)
                pipe.incr(p + "ver")
                pipe.execute()
            except redis.exceptions.WatchError as exc:
                raise Conflict(
                    f"a tracker wrote to the registry in redis at {self.where} during the copy",
                    fix="stop the replicas that use --registry, empty it, and copy again",
                ) from exc
        return {
            "apps": len(apps),
            "manifests": len(manifests),
            "moves": len(events),
            "channels": len(heads),
            "rotations": len(snap.rotations),
        }

    def previous_head(self, app: str, channel: str) -> bytes | None:
        """The manifest the channel pointed at before its current head (for rollback)."""
        with self._redis(f"read the history of channel {channel} of {app}"):
            mid = self._previous(keys=[f"{self.p}ch:{app}:{channel}", f"{self.p}h:{app}:{channel}"])
        return bytes.fromhex(_text(mid)) if mid else None
