"""The traffic series in the registry's Redis (``--registry``), shared by replicas on any host.

Shares :class:`tracker.registry_redis.RedisRegistry`'s clients, circuit breaker and error
translation (a failure is :class:`~tracker.errors.RegistryUnavailable`). A recorder's batch is
one Lua script, applied whole: levels keep the highest value per minute, adds and online
counts are summed (:mod:`tracker.traffic`). Retention is Redis's own: every day's key expires
``RETENTION_S`` plus a day after it was last written.

Keys (under the registry's prefix, ``trk:reg:`` unless ``--redis-prefix``)::

    P trf:m:<mid hex>:<day>      hash: "<minute>:<name>" -> n (one UTC day of one build)
    P trf:builds                 sorted set: manifest id hex, scored by its last minute
    P trf:first                  hash: manifest id hex -> its first minute
    P trf:on:<app>:<day>         hash: hour -> announces
    P trf:fc:<mid hex>           the forecast recorded at its publish (JSON)
"""

from __future__ import annotations

import json
from typing import Any

from .registry_redis import RedisRegistry, _text
from .traffic import MAX_BUILDS, RETENTION_DAYS, RETENTION_S, MinuteRow, TrafficBatch
from .traffic_store import rows_of

__all__ = ["RedisTraffic"]

# ARGV: prefix, ttl s, max builds, then the batch as JSON: {"m": [[mid, day, field, n, max]],
# "o": [[app, day, hour, n]], "b": [[mid, first, last]]}; numbers are strings (cjson reads
# numbers as doubles, which Redis would write back as 1e+15).
_WRITE_LUA = """
local p, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local b = cjson.decode(ARGV[4])
for _, c in ipairs(b.m) do
  local key = p .. 'm:' .. c[1] .. ':' .. c[2]
  if c[5] == '1' then
    local old = redis.call('HGET', key, c[3])
    if not old or tonumber(old) < tonumber(c[4]) then redis.call('HSET', key, c[3], c[4]) end
  else
    redis.call('HINCRBY', key, c[3], c[4])
  end
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
    local first = tonumber(redis.call('HGET', p .. 'first', gone[i]) or gone[i + 1])
    for day = math.floor(first / 1440), math.floor(tonumber(gone[i + 1]) / 1440) do
      redis.call('DEL', p .. 'm:' .. gone[i] .. ':' .. day)
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
        for kind, part in (("1", batch.levels), ("0", batch.adds)):
            for (mid, minute), (_, counts) in part.items():
                h = mid.hex()
                lo, hi = builds.get(h, (minute, minute))
                builds[h] = (min(lo, minute), max(hi, minute))
                day = str(minute // 1440)
                cells += [[h, day, f"{minute}:{k}", str(n), kind] for k, n in counts.items()]
        body = {
            "m": cells,
            "o": [[a, str(d), str(h), str(n)] for (a, d, h), n in batch.online.items()],
            "b": [[h, str(lo), str(hi)] for h, (lo, hi) in builds.items()],
        }
        if not (cells or body["o"]):
            return
        with self._reg._redis("write the traffic series"):
            self._write(args=[self.p, self._ttl, MAX_BUILDS, json.dumps(body)])

    def gc(self, now: float) -> None:
        """Keys expire by themselves; drop the index entries of builds past retention."""
        oldest = (int(now) - RETENTION_S) // 60
        with self._reg._redis("trim the traffic index"):
            gone = self._reg._slow.zrangebyscore(self.p + "builds", "-inf", f"({oldest}")
            if gone:
                self._reg._slow.zrem(self.p + "builds", *gone)
                self._reg._slow.hdel(self.p + "first", *gone)

    def series(self, manifest: bytes) -> tuple[int | None, list[MinuteRow]]:
        h = manifest.hex()
        with self._reg._redis("read the traffic series"):
            r = self._reg._slow
            first, last = r.hget(self.p + "first", h), r.zscore(self.p + "builds", h)
            if first is None or last is None:
                return None, []
            lo = max(int(first), int(last) - RETENTION_S // 60 - 1440) // 1440
            with r.pipeline(transaction=False) as pipe:
                for day in range(lo, int(last) // 1440 + 1):
                    pipe.hgetall(f"{self.p}m:{h}:{day}")
                days = pipe.execute()
        cells = []
        for d in days:
            for k, v in d.items():
                minute, _, name = _text(k).partition(":")
                cells.append((int(minute), name, int(v)))
        cells.sort()
        return int(first), rows_of(cells)

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

    def put_forecast(self, manifest: bytes, app: str, body: dict[str, Any]) -> None:
        with self._reg._redis("record a forecast"):
            self._reg._slow.set(self.p + "fc:" + manifest.hex(), json.dumps(body), ex=self._ttl)

    def forecast(self, manifest: bytes) -> dict[str, Any] | None:
        with self._reg._redis("read a forecast"):
            raw = self._reg._slow.get(self.p + "fc:" + manifest.hex())
        return json.loads(raw) if raw else None
