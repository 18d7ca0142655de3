"""The fleet view in redis-server, shared by every replica (a :class:`FleetStore`).

Theory of operation
-------------------
Replicas each hear some of the announces, so the seats live in Redis, per app (keys under
``PREFIX fleet:``):

* ``seats:APP``, a hash: node id (20 raw bytes) -> ``M|SEEN|CLIENT|OUTCOME``, where ``M`` is
  the first 16 hex digits of the manifest the node runs (``-``: still downloading), ``SEEN``
  Unix seconds, ``CLIENT`` its version and ``OUTCOME`` its last one (``kind,code,to,at``);
* ``builds:APP`` (``M`` -> nodes, ``-`` -> nodes updating), ``clients:APP`` (version ->
  nodes): the counters, moved by the same script that moves a seat, so they never drift;
* ``binfo:APP`` (``M`` -> ``manifest id|build``), ``bseen:APP`` (``M`` -> last seen),
  ``series:APP`` (bucket start -> JSON of ``builds:APP``, sampled once per bucket by whichever
  replica gets there first, ``HSETNX``), ``apps`` (a set), ``recent`` (the last
  ``RECENT_OUTCOMES`` outcomes, JSON), ``joined`` (app -> seats made by a sighting that names
  no complete build: joins, :mod:`tracker.fleet`; sampled into ``series:APP`` as ``+``).

A seat costs about 100 bytes of Redis memory (field, value, hash entry). Recording stays off
the announce path (:class:`tracker.fleet_remote.WriteBehind`): pending seats are written every
``FLUSH_S`` in one pipeline from a worker thread.
Expiry walks each app's seats with ``HSCAN`` a slice per :meth:`gc` and a script drops those
unseen for ``ttl`` (it checks again, atomically, so two replicas sweeping agree).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import trio

from .errors import SwarmUnavailable
from .fleet import FLEET_TTL, MAX_CLIENTS, MAX_RELEASES, SERIES_BUCKET, SERIES_POINTS
from .fleet_remote import RECENT_OUTCOMES, Batch, WriteBehind, app_view_of, seat_of

__all__ = ["RedisFleet"]
#: Seats examined per app per :meth:`RedisFleet.gc`.
SWEEP_COUNT = 5000

_SEEN_LUA = """
local seats, builds, clients = KEYS[1], KEYS[2], KEYS[3]
local binfo, bseen, apps = KEYS[4], KEYS[5], KEYS[6]
local node, m, info, seen, client, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local function move(key, from, to)
  if redis.call('HINCRBY', key, from, -1) <= 0 then redis.call('HDEL', key, from) end
  redis.call('HINCRBY', key, to, 1)
end
local old = redis.call('HGET', seats, node)
local om, oc, out = '-', 'unknown', ''
if old then
  local a, _, c, d = string.match(old, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
  om, oc, out = a, c, d
else
  if m == '' then redis.call('HINCRBY', KEYS[7], ARGV[7], 1) end
  redis.call('HINCRBY', builds, '-', 1)
  redis.call('HINCRBY', clients, 'unknown', 1)
  redis.call('SADD', apps, ARGV[7])
end
local nm, nc = om, oc
if m ~= '' then nm = m end
if client ~= '' and client ~= oc then
  nc = client
  local full = redis.call('HLEN', clients) >= tonumber(ARGV[8])
  if full and redis.call('HEXISTS', clients, nc) == 0 then
    nc = 'other'
  end
end
if nm ~= om then
  move(builds, om, nm)
  redis.call('HSET', binfo, nm, info)
end
if nc ~= oc then move(clients, oc, nc) end
if outcome ~= '' then out = outcome end
redis.call('HSET', seats, node, nm .. '|' .. seen .. '|' .. nc .. '|' .. out)
if nm ~= '-' then
  local s = redis.call('HGET', bseen, nm)
  if (not s) or tonumber(s) < tonumber(seen) then redis.call('HSET', bseen, nm, seen) end
end
return 1
"""

_EXPIRE_LUA = """
local seats, builds, clients = KEYS[1], KEYS[2], KEYS[3]
local deadline = tonumber(ARGV[1])
local gone = 0
local function dec(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end
for i = 2, #ARGV do
  local v = redis.call('HGET', seats, ARGV[i])
  if v then
    local m, s, c = string.match(v, '^([^|]*)|([^|]*)|([^|]*)|')
    if tonumber(s) < deadline then
      dec(builds, m)
      dec(clients, c)
      redis.call('HDEL', seats, ARGV[i])
      gone = gone + 1
    end
  end
end
return gone
"""


class RedisFleet(WriteBehind):
    """The fleet in Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "trk:",
        ttl: float = FLEET_TTL,
        bucket: int = SERIES_BUCKET,
        points: int = SERIES_POINTS,
    ) -> None:
        import redis

        super().__init__()
        self.ttl, self.bucket, self.points = ttl, bucket, points
        self.p = prefix + "fleet:"
        self._r: Any = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self._seen = self._r.register_script(_SEEN_LUA)
        self._expire = self._r.register_script(_EXPIRE_LUA)
        self._cursors: dict[str, int] = {}
        self._sampled = -1

    def _keys(self, app: str) -> list[str]:
        p = self.p
        return [
            f"{p}seats:{app}",
            f"{p}builds:{app}",
            f"{p}clients:{app}",
            f"{p}binfo:{app}",
            f"{p}bseen:{app}",
            f"{p}apps",
            f"{p}joined",
        ]

    def write(self, batch: Batch) -> int:
        """Write taken seats (blocking: from a worker thread); how many."""
        pending, recent = batch
        if not pending and not recent:
            return 0
        pipe = self._r.pipeline(transaction=False)
        for (node, app), (m, info, seen, client, outcome) in pending.items():
            self._seen(
                keys=self._keys(app),
                args=[node, m, info, seen, client, outcome, app, MAX_CLIENTS],
                client=pipe,
            )
        if recent:
            pipe.lpush(self.p + "recent", *recent)
            pipe.ltrim(self.p + "recent", 0, RECENT_OUTCOMES - 1)
        pipe.execute()
        return len(pending)

    async def _call(self, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return await trio.to_thread.run_sync(fn, *args)
        except redis.exceptions.RedisError as exc:
            raise SwarmUnavailable(f"the fleet store (Redis) failed: {exc}") from exc

    # ------------------------------------------------------------------ expiry and curves

    def _gc(self, now: float) -> int:
        apps = sorted(a.decode() for a in self._r.smembers(self.p + "apps"))
        gone = 0
        deadline = int(now - self.ttl)
        for app in apps:
            keys = self._keys(app)
            cursor, seats = self._r.hscan(keys[0], self._cursors.get(app, 0), count=SWEEP_COUNT)
            self._cursors[app] = cursor
            old = [n for n, v in seats.items() if int(v.split(b"|", 2)[1]) < deadline]
            if old:
                gone += int(self._expire(keys=keys[:3], args=[deadline, *old]))
            if self._r.hlen(keys[3]) > MAX_RELEASES:  # forget builds nobody runs
                running = self._r.hkeys(keys[1])
                idle = set(self._r.hkeys(keys[3])) - set(running)
                if idle:
                    self._r.hdel(keys[3], *idle)
                    self._r.hdel(keys[4], *idle)
        b = int(now) // self.bucket
        if b != self._sampled:
            self._sampled = b
            for app in apps:
                self._sample(app, b * self.bucket)
        return gone

    def _sample(self, app: str, at: int) -> None:
        series = f"{self.p}series:{app}"
        counts = {
            k.decode(): int(v)
            for k, v in self._r.hgetall(f"{self.p}builds:{app}").items()
            if k != b"-"
        }
        counts["+"] = int(self._r.hget(self.p + "joined", app) or 0)
        self._r.hsetnx(series, str(at), json.dumps(counts))
        if self._r.hlen(series) > self.points:
            fields = sorted(self._r.hkeys(series), key=int)
            self._r.hdel(series, *fields[: len(fields) - self.points])

    # ------------------------------------------------------------------ views

    def _app_view(self, app: str, now: float) -> dict[str, Any] | None:
        if not self._r.sismember(self.p + "apps", app):
            return None
        p = self.p
        counts = {k.decode(): int(v) for k, v in self._r.hgetall(f"{p}builds:{app}").items()}
        info = {k.decode(): v.decode() for k, v in self._r.hgetall(f"{p}binfo:{app}").items()}
        seen = {k.decode(): float(v) for k, v in self._r.hgetall(f"{p}bseen:{app}").items()}
        series = sorted(
            (int(k), json.loads(v)) for k, v in self._r.hgetall(f"{p}series:{app}").items()
        )
        clients = {k.decode(): int(v) for k, v in self._r.hgetall(f"{p}clients:{app}").items()}
        joined = int(self._r.hget(f"{p}joined", app) or 0)
        return app_view_of(
            app, now, counts, info, seen, series, clients, self.ttl, self.bucket, joined
        )

    def _node_view(self, node: bytes) -> dict[str, Any] | None:
        seats = []
        for app in sorted(a.decode() for a in self._r.smembers(self.p + "apps")):
            v = self._r.hget(f"{self.p}seats:{app}", node)
            if v is None:
                continue
            m, seen, client, out = v.decode().split("|", 3)
            info = self._r.hget(f"{self.p}binfo:{app}", m) if m != "-" else None
            text = info.decode() if info else None
            seats.append(seat_of(app, int(seen), client, out, text, self.ttl))
        if not seats:
            return None
        recent = []
        for raw in self._r.lrange(self.p + "recent", 0, -1):
            o = json.loads(raw)
            if o.pop("node_id") == node.hex():
                recent.append(o)
        return {"node_id": node.hex(), "apps": seats, "recent_outcomes": recent[:20]}

    def _gauges(self) -> dict[str, Any]:
        out: dict[str, Any] = {"builds": [], "clients": [], "updating": []}
        for app in sorted(a.decode() for a in self._r.smembers(self.p + "apps")):
            counts = self._r.hgetall(f"{self.p}builds:{app}")
            info = self._r.hgetall(f"{self.p}binfo:{app}")
            for m, n in counts.items():
                if m == b"-":
                    out["updating"].append((app, int(n)))
                elif m in info:
                    manifest, build = info[m].decode().split("|")
                    out["builds"].append((app, manifest, int(build), int(n)))
            for c, n in self._r.hgetall(f"{self.p}clients:{app}").items():
                out["clients"].append((app, c.decode(), int(n)))
        return out

    # ------------------------------------------------------------------ moving to PostgreSQL

    def apps(self) -> list[str]:
        return sorted(a.decode() for a in self._r.smembers(self.p + "apps"))

    def seat_chunks(self, app: str) -> Iterator[list[tuple[bytes, str, int, str, str]]]:
        """The app's seats, ``SWEEP_COUNT`` or so at a time: (node, m, seen, client,
        outcome)."""
        cursor = None
        while cursor != 0:
            cursor, seats = self._r.hscan(f"{self.p}seats:{app}", cursor or 0, count=SWEEP_COUNT)
            out = []
            for node, v in seats.items():
                m, seen, client, outcome = v.decode().split("|", 3)
                out.append((bytes(node), m, int(seen), client, outcome))
            yield out

    def builds(self, app: str) -> list[tuple[str, str, float]]:
        """(m, ``manifest id|build``, last seen) of every build the app's seats ran."""
        p = self.p
        info = {k.decode(): v.decode() for k, v in self._r.hgetall(f"{p}binfo:{app}").items()}
        seen = {k.decode(): float(v) for k, v in self._r.hgetall(f"{p}bseen:{app}").items()}
        return [(m, text, seen.get(m, 0.0)) for m, text in sorted(info.items())]

    def series(self, app: str) -> list[tuple[int, str]]:
        """The app's adoption samples: (bucket start, JSON of seats per ``m``)."""
        raw = self._r.hgetall(f"{self.p}series:{app}")
        return sorted((int(k), v.decode()) for k, v in raw.items())

    def joined(self, app: str) -> int:
        """The app's seats made by a sighting that named no complete build (its joins)."""
        return int(self._r.hget(f"{self.p}joined", app) or 0)

    def recent(self) -> list[str]:
        """The kept outcomes (JSON with ``node_id``), oldest first."""
        return [v.decode() for v in reversed(self._r.lrange(self.p + "recent", 0, -1))]

    def close(self) -> None:
        self._r.close()
