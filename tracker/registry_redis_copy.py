"""Copy a SQLite registry (``DIR/registry.db``) into an empty Redis one:
``tracker registry copy`` for :meth:`tracker.registry_redis.RedisRegistry.copy_from_sqlite`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Conflict
from .registry_redis import HISTORY_KEEP

if TYPE_CHECKING:
    from .registry_redis import RedisRegistry


def copy_sqlite_registry(reg: RedisRegistry, path: Path) -> dict[str, int]:
    """The body of :meth:`~tracker.registry_redis.RedisRegistry.copy_from_sqlite` (see there)."""
    import redis

    from .registry_sqlite import read_snapshot

    snap = read_snapshot(path)
    apps, manifests, events, heads = snap.apps, snap.manifests, snap.events, snap.heads
    last_seq = snap.last_seq
    info = {bytes(m[0]): (m[2], m[3]) for m in manifests}
    at_of = {e[0]: e[5] for e in events}
    p = reg.p
    guarded = [p + "ver", p + "seq", p + "apps"]
    with reg._redis("copy the SQLite registry"), reg._slow.pipeline() as pipe:
        try:
            pipe.watch(*guarded)
            if pipe.exists(*guarded):
                raise Conflict(
                    f"the registry in redis at {reg.where} (prefix {p}) is not empty",
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
                f"a tracker wrote to the registry in redis at {reg.where} during the copy",
                fix="stop the replicas that use --registry, empty it, and copy again",
            ) from exc
    return {
        "apps": len(apps),
        "manifests": len(manifests),
        "moves": len(events),
        "channels": len(heads),
        "rotations": len(snap.rotations),
    }
