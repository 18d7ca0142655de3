"""The traffic series in the registry's Redis (``--registry``), shared by replicas on any host.

Shares :class:`tracker.registry_redis.RedisRegistry`'s clients, circuit breaker and error
translation (a failure is :class:`~tracker.errors.RegistryUnavailable`). A recorder's batch is
one Lua script, applied whole: levels keep the highest value per minute, adds and online
counts are summed (:mod:`tracker.traffic`). A build's minutes are kept an hour per hash, a
field per minute, so that each hash stays small enough for Redis's compact encoding (about 50
bytes a minute). Retention is Redis's own: every key expires ``RETENTION_S`` plus a day after
it was last written.

Keys (under the registry's prefix, ``trk:reg:`` unless ``--redis-prefix``)::

    P trf:m:<mid hex>:<hour>     hash: minute -> "completed,peers,cdn,reused,patches,
                                 patches_cdn,patches_peers" (one hour of one build; a level
                                 is empty when not sampled then; minutes written before the
                                 patches' split end at patches)
    P trf:builds                 sorted set: manifest id hex, scored by its last minute
    P trf:first                  hash: manifest id hex -> its first minute
    P trf:on:<app>:<day>         hash: hour -> announces
    P trf:fe:<mid hex>           hash: "<channel>|<at>" -> the forecast recorded at that event
                                 of the build (JSON: publish, promote, rollout raise)
    P trf:fes                    sorted set: "<mid hex>|<channel>|<at>", scored by ``at``
    P trf:b:<batch id hex>       "1": that batch was applied (expires after ``RETENTION_S``)

Each batch is applied once: the script first sets its id's key (``NX``) and changes nothing
if the key was there, so a write whose reply was lost and that is sent again (redis-py
resends a command once on a dropped connection, and the recorder retries a failed batch
whole) does not add its bytes twice. The ids cost ~113 bytes each (measured, ``used_memory``),
one per flush (every 10 s per replica): ~7 MB per replica over the week they are kept.

Forecasts written before a build could have several (``trf:fc:<mid hex>``, one JSON string,
indexed in ``trf:fcs``) are still read, as publish events, until they expire.
"""

from __future__ import annotations

import json
from typing import Any

from .forecast import MAX_FORECASTS
from .registry_redis import RedisRegistry
from .registry_redis_link import _text
from .traffic import (
    ADD_NAMES,
    FORECAST_RETENTION_S,
    LEVEL_NAMES,
    MAX_BUILDS,
    RETENTION_DAYS,
    RETENTION_S,
    MinuteRow,
    TrafficBatch,
)

__all__ = ["RedisTraffic"]

# ARGV: prefix, ttl s, max builds, the batch as JSON (below), the longest span of a build's
# minutes, the batch id (hex) and how long to remember it (s). The id is set first, NX: a
# batch sent again (redis-py resends a script whose reply was lost) finds it and changes
# nothing. The batch as JSON: {"m": [[mid, hour, minute, kind, values...]] (kind L:
# completed, peers, cdn; kind A: reused, patches, patches_cdn, patches_peers), "o": [[app,
# day, hour, n]], "b": [[mid, first, last]]}; numbers are strings (cjson reads numbers as
# doubles, which tostring would write as 1e+15).
_WRITE_LUA = """
local p, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if not redis.call('SET', p .. 'b:' .. ARGV[6], '1', 'NX', 'EX', ARGV[7]) then return 0 end
local b = cjson.decode(ARGV[4])
local function num(x) return string.format('%.0f', x) end
for _, c in ipairs(b.m) do
  local key = p .. 'm:' .. c[1] .. ':' .. c[2]
  local old = redis.call('HGET', key, c[3])
  local t = {'', '', '', '0', '0', '0', '0'}
  if old then  -- (a minute written before the patches' split has five fields)
    local i = 1
    for x in string.gmatch(old .. ',', '([^,]*),') do t[i] = x; i = i + 1 end
  end
  if c[4] == 'L' then
    for i = 1, 3 do
      if t[i] == '' or tonumber(t[i]) < tonumber(c[4 + i]) then t[i] = c[4 + i] end
    end
  else
    for i = 4, 7 do t[i] = num(tonumber(t[i]) + tonumber(c[1 + i])) end
  end
  redis.call('HSET', key, c[3], table.concat(t, ','))
  redis.call('EXPIRE', key, ttl)
end
for _, c in ipairs(b.o) do
  local key = p .. 'on:' .. c[1] .. ':' .. c[2]
  redis.call('HINCRBY', key, c[3], c[4])
  redis.call('EXPIRE', key, ttl)
end
for _, c in ipairs(b.b) do
  local last = redis.call('ZSCORE', p .. 'builds', c[1])
  if not last or tonumber(last) < tonumber(c[3]) then
    redis.call('ZADD', p .. 'builds', c[3], c[1])
  end
  local first = redis.call('HGET', p .. 'first', c[1])
  if not first or tonumber(first) > tonumber(c[2]) then
    redis.call('HSET', p .. 'first', c[1], c[2])
  end
end
local over = redis.call('ZCARD', p .. 'builds') - cap
if over > 0 then
  local gone = redis.call('ZPOPMIN', p .. 'builds', over)
  for i = 1, #gone, 2 do
    local last = tonumber(gone[i + 1])
    local first = tonumber(redis.call('HGET', p .. 'first', gone[i]) or last)
    first = math.max(first, last - tonumber(ARGV[5]))
    for hour = math.floor(first / 60), math.floor(last / 60) do
      redis.call('DEL', p .. 'm:' .. gone[i] .. ':' .. hour)
    end
    redis.call('HDEL', p .. 'first', gone[i])
  end
end
return 1
"""


class RedisTraffic:
    """A :class:`tracker.traffic_store.TrafficStore` beside a :class:`RedisRegistry`."""

    blocking = True

    def __init__(self, registry: RedisRegistry) -> None:
        self._reg = registry
        self.p = registry.p + "trf:"
        self._write = registry._slow.register_script(_WRITE_LUA)
        self._ttl = RETENTION_S + 86400

    def close(self) -> None:
        """The registry owns the clients."""

    def write(self, batch: TrafficBatch) -> None:
        cells: list[list[str]] = []
        builds: dict[str, tuple[int, int]] = {}
        for kind, names, part in (("L", LEVEL_NAMES, batch.levels), ("A", ADD_NAMES, batch.adds)):
            for (mid, minute), (_, counts) in part.items():
                h = mid.hex()
                lo, hi = builds.get(h, (minute, minute))
                builds[h] = (min(lo, minute), max(hi, minute))
                values = [str(counts.get(n, 0)) for n in names]
                cells.append([h, str(minute // 60), str(minute), kind, *values])
        body = {
            "m": cells,
            "o": [[a, str(d), str(h), str(n)] for (a, d, h), n in batch.online.items()],
            "b": [[h, str(lo), str(hi)] for h, (lo, hi) in builds.items()],
        }
        if not (cells or body["o"]):
            return
        with self._reg._redis("write the traffic series"):
            self._write(
                args=[
                    self.p,
                    self._ttl,
                    MAX_BUILDS,
                    json.dumps(body),
                    RETENTION_S // 60 + 1440,
                    batch.id.hex(),
                    RETENTION_S,
                ]
            )

    def gc(self, now: float) -> None:
        """Keys expire by themselves; drop the index entries of builds past retention."""
        oldest = (int(now) - RETENTION_S) // 60
        with self._reg._redis("trim the traffic index"):
            gone = self._reg._slow.zrangebyscore(self.p + "builds", "-inf", f"({oldest}")
            if gone:
                self._reg._slow.zrem(self.p + "builds", *gone)
                self._reg._slow.hdel(self.p + "first", *gone)
            old = f"({now - FORECAST_RETENTION_S}"
            self._reg._slow.zremrangebyscore(self.p + "fcs", "-inf", old)
            self._drop_events(self._reg._slow.zrangebyscore(self.p + "fes", "-inf", old))

    def series(self, manifest: bytes) -> tuple[int | None, list[MinuteRow]]:
        h = manifest.hex()
        with self._reg._redis("read the traffic series"):
            r = self._reg._slow
            first, last = r.hget(self.p + "first", h), r.zscore(self.p + "builds", h)
            if first is None or last is None:
                return None, []
            lo = max(int(first), int(last) - RETENTION_S // 60 - 1440) // 60
            with r.pipeline(transaction=False) as pipe:
                for hour in range(lo, int(last) // 60 + 1):
                    pipe.hgetall(f"{self.p}m:{h}:{hour}")
                hours = pipe.execute()
        rows = []
        for fields in hours:
            for k, v in fields.items():
                values = _text(v).split(",")
                levels = values[: len(LEVEL_NAMES)]
                adds = values[len(LEVEL_NAMES) :]  # fewer in a minute from before the split
                rows.append(
                    MinuteRow(
                        int(_text(k)),
                        dict(zip(LEVEL_NAMES, map(int, levels), strict=True)) if levels[0] else {},
                        {n: int(x) for n, x in zip(ADD_NAMES, adds, strict=False) if int(x)},
                    )
                )
        rows.sort(key=lambda row: row.minute)
        return int(first), rows

    def online_cells(self, app: str, now: float) -> list[tuple[int, int, int]]:
        today = int(now) // 86400
        days = range(today - RETENTION_DAYS, today + 2)
        with (
            self._reg._redis("read the online hours"),
            self._reg._slow.pipeline(transaction=False) as pipe,
        ):
            for day in days:
                pipe.hgetall(f"{self.p}on:{app}:{day}")
            rows = pipe.execute()
        return [
            (day, int(_text(h)), int(n))
            for day, row in zip(days, rows, strict=True)
            for h, n in sorted(row.items(), key=lambda kv: int(_text(kv[0])))
        ]

    def _drop_events(self, members: list[Any]) -> None:
        """Forget these ``fes`` members and their forecasts."""
        if not members:
            return
        with self._reg._slow.pipeline() as pipe:
            for m in members:
                h, field = _text(m).split("|", 1)
                pipe.hdel(self.p + "fe:" + h, field)
            pipe.zrem(self.p + "fes", *members)
            pipe.execute()

    def put_forecast(self, manifest: bytes, app: str, body: dict[str, Any]) -> None:
        h = manifest.hex()
        field = f"{body.get('channel', '')}|{float(body.get('at', 0))!r}"
        with self._reg._redis("record a forecast"):
            with self._reg._slow.pipeline() as pipe:
                pipe.hset(self.p + "fe:" + h, field, json.dumps({**body, "_app": app}))
                pipe.expire(self.p + "fe:" + h, FORECAST_RETENTION_S)
                pipe.zadd(self.p + "fes", {f"{h}|{field}": float(body.get("at", 0))})
                pipe.zcard(self.p + "fes")
                count = pipe.execute()[-1]
            if count > MAX_FORECASTS:
                self._drop_events(
                    self._reg._slow.zrange(self.p + "fes", 0, count - MAX_FORECASTS - 1)
                )

    def forecasts(self, manifest: bytes) -> list[dict[str, Any]]:
        h = manifest.hex()
        with self._reg._redis("read a build's forecasts"):
            events = self._reg._slow.hgetall(self.p + "fe:" + h)
            old = self._reg._slow.get(self.p + "fc:" + h)
        bodies = [json.loads(raw) for raw in [*events.values(), *([old] if old else [])]]
        out: dict[tuple[str, float], dict[str, Any]] = {}
        for body in bodies:
            body.pop("_app", None)
            out.setdefault((str(body.get("channel", "")), float(body.get("at", 0))), body)
        return [out[k] for k in sorted(out, key=lambda k: (k[1], k[0]))]

    def forecasts_since(self, since: float) -> list[tuple[bytes, str, dict[str, Any]]]:
        with self._reg._redis("read forecasts"):
            r = self._reg._slow
            members = [_text(m) for m in r.zrangebyscore(self.p + "fes", since, "+inf")]
            olds = [_text(m) for m in r.zrangebyscore(self.p + "fcs", since, "+inf")]
            with r.pipeline(transaction=False) as pipe:
                for m in members:
                    h, field = m.split("|", 1)
                    pipe.hget(self.p + "fe:" + h, field)
                for h in olds:
                    pipe.get(self.p + "fc:" + h)
                raws = pipe.execute()
        out = []
        for h, raw in zip([m.split("|", 1)[0] for m in members] + olds, raws, strict=True):
            if raw:
                body = json.loads(raw)
                out.append((bytes.fromhex(h), body.pop("_app", ""), body))
        out.sort(key=lambda x: float(x[2].get("at", 0)))
        return out
