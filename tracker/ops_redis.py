"""Install outcomes, staged rollouts and the audit log in the registry's Redis (``--registry``).

Shares :class:`tracker.registry_redis.RedisRegistry`'s clients, circuit breaker and error
translation (a failure is :class:`~tracker.errors.RegistryUnavailable`, HTTP 503). An outcome
is one script (replay guard, counters, bound on builds: whole or nothing); a rollout change is
an optimistic transaction (WATCH the rollouts hash, apply the pure change, MULTI/EXEC, again if
another replica changed it meanwhile); an audit entry is one script that takes the next number
and appends. Nothing deletes audit entries.

Keys (under the registry's prefix, ``trk:reg:`` unless ``--redis-prefix``)::

    P ops:seen:<digest hex>      an outcome's signature digest, expiring after the replay window
    P ops:builds                 sorted set: manifest id hex, scored by its last report
    P ops:o:<mid hex>            hash: counter name -> n, and _app, _build
    P ops:oh:<mid hex>           hash: "<hour>:<name>" -> n (outcomes.series_counts), and
                                 _hour (the hour whose first outcome dropped the expired ones)
    P ops:rollouts               hash: "<app>:<channel>" -> rollout JSON
    P ops:rn:<nodes key>         hash: node id (raw) -> "1" latest outcome failed / "0" not
                                 (rollout.nodes_key; at most rollout.MAX_NODES fields)
    P ops:rnsets                 hash: nodes key -> "<app>:<channel>", to drop old sets
    P ops:audit:seq              counter of audit entries
    P ops:audit                  sorted set: "<seq> <entry JSON>", scored by seq
"""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any, cast

from .backend import AuditEntry
from .errors import Conflict
from .ops_sqlite import audit_row, read_ops_snapshot
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
from .registry_redis import RedisRegistry
from .registry_redis_link import _text
from .rollout import MAX_NODES, NodeWas, Rollout

__all__ = ["RedisOps"]

# KEYS: seen, builds. ARGV: window ms, now, app, max builds, counts prefix, number of
# builds, series prefix, this hour, oldest hour kept; then per build: mid hex, build, number
# of counters, name, n pairs, number of series counters, name, n pairs.
_OUTCOME_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local i, mine, hour, oldest = 10, {}, ARGV[8], tonumber(ARGV[9])
for _ = 1, tonumber(ARGV[6]) do
  local mid, np = ARGV[i], tonumber(ARGV[i + 2])
  local key, series = ARGV[5] .. mid, ARGV[7] .. mid
  mine[mid] = true
  redis.call('ZADD', KEYS[2], ARGV[2], mid)
  redis.call('HSET', key, '_app', ARGV[3], '_build', ARGV[i + 1])
  for j = i + 3, i + 1 + 2 * np, 2 do redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1]) end
  i = i + 3 + 2 * np
  local ns = tonumber(ARGV[i])
  for j = i + 1, i - 1 + 2 * ns, 2 do
    redis.call('HINCRBY', series, hour .. ':' .. ARGV[j], ARGV[j + 1])
  end
  i = i + 1 + 2 * ns
  if redis.call('HGET', series, '_hour') ~= hour then  -- a new hour: drop the expired ones
    for _, f in ipairs(redis.call('HKEYS', series)) do
      local h = tonumber(string.match(f, '^(%d+):'))
      if h and h < oldest then redis.call('HDEL', series, f) end
    end
    redis.call('HSET', series, '_hour', hour)
  end
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, mid in ipairs(redis.call('ZPOPMIN', KEYS[2], over)) do
    if not mine[mid] and string.len(mid) == 64 then
      redis.call('DEL', ARGV[5] .. mid, ARGV[7] .. mid)
    end
  end
end
return 1
"""
# KEYS: node set, sets. ARGV: node id, "1" failed / "0", most nodes, nodes key, app:channel.
_ROLLOUT_NODE_LUA = """
local was = redis.call('HGET', KEYS[1], ARGV[1])
if not was then
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 'full' end
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if not was then return 'new' elseif was == '1' then return 'failed' end
return 'ok'
"""
# KEYS: seq, log. ARGV: entry JSON.
_AUDIT_LUA = """
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, seq .. ' ' .. ARGV[1])
return seq
"""


class RedisOps:
    """A :class:`tracker.backend.OpsStore` beside a :class:`RedisRegistry`, on its clients."""

    blocking = True

    def __init__(self, registry: RedisRegistry) -> None:
        self._reg = registry
        self.p = registry.p + "ops:"
        self._outcome = registry._slow.register_script(_OUTCOME_LUA)
        self._audit = registry._slow.register_script(_AUDIT_LUA)
        self._rollout_node = registry._slow.register_script(_ROLLOUT_NODE_LUA)

    def close(self) -> None:
        """The registry owns the clients."""

    # ---------------------------------------------------------------- outcomes

    def add_outcome(self, o: Outcome, digest: bytes, now: float, window: float) -> bool:
        tallies, hour = tallies_of(o), int(now // SERIES_STEP)
        args: list[Any] = [int(window * 1000), repr(now), o.app, MAX_RELEASES, self.p + "o:"]
        args += [len(tallies), self.p + "oh:", hour, hour - SERIES_HOURS + 1]
        for mid, build, counts in tallies:
            series = series_counts(counts)
            args += [mid.hex(), build, len(counts), *chain(*counts.items())]
            args += [len(series), *chain(*series.items())]
        with self._reg._redis("count an install outcome"):
            fresh = self._outcome(
                keys=[self.p + "seen:" + digest.hex(), self.p + "builds"], args=args
            )
        return bool(fresh)

    def outcome_series(self, app: str | None, since: int) -> SeriesRows:
        r = self._reg
        with r._redis("read install outcome series"), r._slow.pipeline(False) as pipe:
            mids = [_text(m) for m in r._slow.zrevrange(self.p + "builds", 0, -1)]
            for mid in mids:
                pipe.hget(self.p + "o:" + mid, "_app")
                pipe.hgetall(self.p + "oh:" + mid)
            rows = pipe.execute()
        out: SeriesRows = {}
        for mid, a, row in zip(mids, rows[::2], rows[1::2], strict=True):
            if a is None or (app is not None and _text(a) != app):
                continue
            for k, v in row.items():
                hour, _, name = _text(k).partition(":")
                if name and int(hour) >= since:
                    out.setdefault(bytes.fromhex(mid), []).append((int(hour), name, int(v)))
        return out

    def outcome_stats(self, app: str | None) -> list[dict[str, Any]]:
        with self._reg._redis("read install outcomes"):
            builds = self._reg._slow.zrevrange(self.p + "builds", 0, -1, withscores=True)
            with self._reg._slow.pipeline(transaction=False) as pipe:
                for mid, _ in builds:
                    pipe.hgetall(self.p + "o:" + _text(mid))
                rows = pipe.execute()
        out = []
        for (mid, last), row in zip(builds, rows, strict=True):
            fields = {_text(k): _text(v) for k, v in row.items()}
            a = fields.pop("_app", None)
            build = fields.pop("_build", None)
            if a is None or build is None or (app is not None and a != app):
                continue
            counts = {k: int(v) for k, v in fields.items()}
            out.append(summary(bytes.fromhex(_text(mid)), a, int(build), counts, float(last)))
        return out

    # ---------------------------------------------------------------- rollouts

    def rollout(self, app: str, channel: str) -> Rollout | None:
        with self._reg._redis(f"read the rollout of {app}/{channel}"):
            raw = self._reg._fast.hget(self.p + "rollouts", f"{app}:{channel}")
        return Rollout.from_json(json.loads(raw)) if raw else None

    def rollout_node(self, key: str, app: str, channel: str, node: bytes, failed: bool) -> NodeWas:
        with self._reg._redis(f"note a node's outcome for the rollout of {app}/{channel}"):
            was = self._rollout_node(
                keys=[self.p + "rn:" + key, self.p + "rnsets"],
                args=[node, "1" if failed else "0", MAX_NODES, key, f"{app}:{channel}"],
            )
        return cast(NodeWas, _text(was))

    def drop_rollout_nodes(self, app: str, channel: str, keep: str | None) -> None:
        with self._reg._redis(f"forget the old rollout node sets of {app}/{channel}"):
            sets = self._reg._slow.hgetall(self.p + "rnsets")
            old = [
                _text(k)
                for k, v in sets.items()
                if _text(v) == f"{app}:{channel}" and _text(k) != keep
            ]
            if old:
                self._reg._slow.unlink(*[self.p + "rn:" + k for k in old])
                self._reg._slow.hdel(self.p + "rnsets", *old)

    def rollouts(self) -> list[Rollout]:
        with self._reg._redis("read rollouts"):
            rows = self._reg._fast.hgetall(self.p + "rollouts")
        out = [Rollout.from_json(json.loads(v)) for v in rows.values()]
        return sorted(out, key=lambda r: (r.app, r.channel))

    def put_rollout(self, r: Rollout) -> None:
        with self._reg._redis(f"store the rollout of {r.app}/{r.channel}"):
            self._reg._slow.hset(
                self.p + "rollouts", f"{r.app}:{r.channel}", json.dumps(r.to_json())
            )

    def update_rollout(
        self, app: str, channel: str, fn: Callable[[Rollout], Rollout]
    ) -> tuple[Rollout, Rollout] | None:
        import redis

        key, field = self.p + "rollouts", f"{app}:{channel}"
        what = f"change the rollout of {app}/{channel}"
        with self._reg._redis(what), self._reg._slow.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, field)
                    if raw is None:
                        return None
                    before = Rollout.from_json(json.loads(raw))
                    after = fn(before)
                    pipe.multi()
                    if after != before:
                        pipe.hset(key, field, json.dumps(after.to_json()))
                    pipe.execute()
                    return before, after
                except redis.exceptions.WatchError:
                    continue  # another replica changed it: apply fn to the new value

    # ---------------------------------------------------------------- audit log

    def audit(self, e: AuditEntry) -> int:
        entry = json.dumps(audit_row(0, e))
        with self._reg._redis("append to the audit log"):
            seq = self._audit(keys=[self.p + "audit:seq", self.p + "audit"], args=[entry])
        return int(seq)

    def audit_page(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        top = f"({before}" if before is not None else "+inf"
        with self._reg._redis("read the audit log"):
            rows = self._reg._fast.zrevrangebyscore(
                self.p + "audit", top, "-inf", start=0, num=limit
            )
        out = []
        for raw in rows:
            seq, _, entry = _text(raw).partition(" ")
            out.append({**json.loads(entry), "seq": int(seq)})
        return out

    # ---------------------------------------------------------------- moving from SQLite

    def copy_from_sqlite(self, path: Path) -> dict[str, int]:
        """Copy ``DIR/ops.db`` (outcome tallies, rollouts, the audit log with its numbers)
        into this store, which must be empty; one snapshot read, one MULTI/EXEC written
        (``tracker registry copy`` calls it after the registry's copy).

        Raises:
            Conflict: this store is not empty.
            RegistryUnavailable: Redis failed; nothing was written.
        """
        snap = read_ops_snapshot(path)
        builds, counts, rollouts, audit = snap.builds, snap.counts, snap.rollouts, snap.audit
        p, r = self.p, self._reg
        with r._redis("copy the SQLite operations store"):
            if r._slow.exists(p + "audit:seq", p + "rollouts", p + "builds"):
                raise Conflict(
                    f"the operations store in redis at {r.where} (prefix {p}) is not empty",
                    fix="copy into an empty redis database or another --redis-prefix",
                )
            with r._slow.pipeline() as pipe:
                for mid, app, build, last in builds:
                    h = bytes(mid).hex()
                    pipe.zadd(p + "builds", {h: last})
                    pipe.hset(p + "o:" + h, mapping={"_app": app, "_build": build})
                for mid, name, n in counts:
                    pipe.hset(p + "o:" + bytes(mid).hex(), name, n)
                for app, channel, body in rollouts:
                    pipe.hset(p + "rollouts", f"{app}:{channel}", body)
                for seq, at, action, actor, token_id, address, target, detail in audit:
                    e = AuditEntry(at, action, actor, token_id, address, target, json.loads(detail))
                    pipe.zadd(p + "audit", {f"{seq} {json.dumps(audit_row(0, e))}": seq})
                pipe.set(p + "audit:seq", max([0] + [a[0] for a in audit]))
                pipe.execute()
        return {"outcome_builds": len(builds), "rollouts": len(rollouts), "audit": len(audit)}
