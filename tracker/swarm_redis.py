"""Swarm state in redis-server, shared by replicas: the default ``--redis`` mode (``script``).

Theory of operation
-------------------
Every announce and report is a single Lua script (one round trip, atomic), so two replicas can
never interleave half-updates of the same swarm. The scripts are ``swarm_redis_announce.lua``
and ``swarm_redis_report.lua`` beside this module, read once at import. Quality scores use the
formula of :func:`tracker.quality.quality_score` (the Lua copy is checked against it by the tests),
and the announce script ranks the answer in Redis as :func:`tracker.quality.rank_peers` specifies,
sending back only the answer.

redis-py's client is synchronous: every call runs in a worker thread. Announces that arrive
while a commit is on its way are sent together as one pipelined group commit
(:meth:`RedisSwarm.announce_many`; see :meth:`RedisSwarm.announce`), so under load the thread
hop and the round trip are paid once per batch. Any Redis failure becomes
:class:`tracker.errors.SwarmUnavailable` (HTTP 503 naming the server), never a 500.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio

from p2pnode.discovery.dht.records import PeerRecordError, decode_bundle
from p2pnode.release import keys

from .backend import AnnounceAnswer, AnnounceCommit, ReportCommit
from .errors import SwarmUnavailable
from .quality import FLAG_REPORTERS, RATE_HALF, PeerQuality
from .stats import UNKNOWN_SCORE, quality_stats, release_stats
from .swarm import ADOPTION_KEEP_S, PARTIAL_SWARMS

__all__ = ["CANDIDATES_PER_SWARM", "RedisSwarm", "peer_fragment"]

#: Candidates fetched per swarm before ranking, at most. Redis's script takes the
#: ``numwant + 9`` freshest members of a swarm (room for the announcer and a few flagged peers)
#: and ranks them by score itself, sending back only the answer: with ``2 * numwant + 1`` the
#: script cost redis-server 322 us per announce, with ``numwant + 9`` 239 us (ranking among
#: the freshest announcers is a sample either way in a big swarm).
CANDIDATES_PER_SWARM = 200

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
#   P done:<mid hex>           set of node hex whose completion was counted (expires
#                              ADOPTION_KEEP_S after the latest)
#   P q:<node hex>             hash mib/failures/corrupt/rate/reports/cr
#   P qc:<node hex>            set of reporter ids that saw corrupt data
#   P qs                       hash node hex -> score (a flagged node's score is 0)
#   P flagged                  hash node hex -> time flagged

_ANNOUNCE_LUA = resources.files(__package__).joinpath("swarm_redis_announce.lua").read_text()
_REPORT_LUA = resources.files(__package__).joinpath("swarm_redis_report.lua").read_text()


def peer_fragment(c: AnnounceCommit) -> bytes:
    """A member's object in announce answers (docs/tracker-api.md), rendered once when it
    announces, open at the end for its score, which reports change meanwhile."""
    a, ip, record = c.announce, c.ip, c.record
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
    """Swarm state in redis-server, shared by every replica pointed at the same server/prefix
    (a :class:`tracker.backend.SwarmStore`).

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
        self._pending: list[_Pending] = []
        self._committing = False

    # ------------------------------------------------------------------ the async interface

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background: the state lives in Redis."""
        task_status.started()
        await trio.sleep_forever()

    async def announce(self, c: AnnounceCommit) -> AnnounceAnswer | None:
        """Run the announce in the next group commit (:meth:`announce_many`).

        The first announce to arrive while no commit runs leads: it sends everything queued in
        one pipelined round trip from a worker thread, and loops while more arrived meanwhile;
        the others wait for their result. The leader's loop is shielded from its own request's
        cancellation (it works for the others too); each commit is bounded by the Redis
        client's socket timeout.
        """
        slot = _Pending(c)
        self._pending.append(slot)
        if not self._committing:
            self._committing = True
            try:
                with trio.CancelScope(shield=True):
                    while self._pending:
                        batch, self._pending = self._pending, []
                        try:
                            results = await trio.to_thread.run_sync(
                                self.announce_many, [b.commit for b in batch]
                            )
                        except Exception as exc:  # redis down: every waiter gets the error
                            for b in batch:
                                b.error = exc
                                b.done.set()
                            continue
                        for b, r in zip(batch, results, strict=True):
                            b.result = r
                            b.done.set()
            finally:
                self._committing = False
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    async def report(self, c: ReportCommit) -> bool:
        return await trio.to_thread.run_sync(self._report_now, c)

    async def quality(self, node_id: bytes) -> PeerQuality:
        return await trio.to_thread.run_sync(self._quality_now, node_id)

    async def clear_peer(self, node_id: bytes) -> bool:
        return await trio.to_thread.run_sync(self._clear_peer_now, node_id)

    async def gc(self, now: float) -> int:
        return await trio.to_thread.run_sync(self._gc_now, now)

    async def stats(self, now: float) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self._stats_now, now)

    async def check(self) -> None:
        await trio.to_thread.run_sync(self.ping)

    # ------------------------------------------------------------------ blocking calls

    @_redis_errors
    def ping(self) -> bool:
        """Redis answers (blocking)."""
        return bool(self._r.ping())

    def close(self) -> None:
        self._r.close()

    @_redis_errors
    def announce_many(self, batch: list[AnnounceCommit]) -> list[AnnounceAnswer | None]:
        """Group commit: several announces' scripts in one pipelined round trip (each script
        stays atomic on its own). Blocking: run it in a worker thread."""
        import redis

        args = [self._announce_args(c) for c in batch]
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

    def _announce_args(self, c: AnnounceCommit) -> list[Any]:
        a, ip, record, now = c.announce, c.ip, c.record, c.now
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
            repr(now + c.ttl),
            a.event,
            a.left,
            a.from_peers,
            a.from_cdn,
            a.uploaded,
            info,
            a.numwant,
            min(CANDIDATES_PER_SWARM, a.numwant + 9),
            PARTIAL_SWARMS,
            max(1, int(c.window)),
            c.digest.hex(),
            b"%d " % a.left + peer_fragment(c),
            repr(UNKNOWN_SCORE),
            a.port,
            ADOPTION_KEEP_S,
        ]

    @_redis_errors
    def _report_now(self, c: ReportCommit) -> bool:
        r = c.report
        args: list[Any] = [
            self.prefix,
            r.node_id.hex(),
            max(1, int(c.window)),
            c.digest.hex(),
            FLAG_REPORTERS,
            RATE_HALF,
            repr(c.now),
        ]
        for e in r.peers:
            args += [e.node_id.hex(), e.bytes, e.rate, e.failures, e.corrupt]
        return bool(self._report(args=args))

    @_redis_errors
    def _quality_now(self, node_id: bytes) -> PeerQuality:
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
    def _clear_peer_now(self, node_id: bytes) -> bool:
        n = node_id.hex()
        p = self.prefix
        with self._r.pipeline() as pipe:
            pipe.delete(p + "q:" + n, p + "qc:" + n)
            pipe.hdel(p + "qs", n)
            pipe.hdel(p + "flagged", n)
            res = pipe.execute()
        return bool(res[0])

    @_redis_errors
    def _gc_now(self, now: float) -> int:
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
    def _stats_now(self, now: float) -> dict[str, Any]:
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
                release_stats(
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
        return {"releases": out, "quality": quality_stats(scores, flagged)}


class _Pending:
    """One announce waiting for a group commit."""

    __slots__ = ("commit", "done", "error", "result")

    def __init__(self, commit: AnnounceCommit) -> None:
        self.commit = commit
        self.done = trio.Event()
        self.result: AnnounceAnswer | None = None
        self.error: Exception | None = None
