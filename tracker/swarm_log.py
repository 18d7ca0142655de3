"""Replicas on Redis as a replicated state machine: the opt-in ``--redis-mode log``.

Theory of operation
-------------------
In the default Redis mode (:class:`tracker.swarm_redis.RedisSwarm`) every announce runs a Lua script
in redis-server (~240 us of its CPU) and the tracker parses the script's answer: on a 2-core
host that caps one tracker near 2,500 announces/s. In log mode Redis only *orders* changes;
every replica keeps the whole swarm state in memory (:class:`tracker.swarm_log_state.ReplicaState`,
a :class:`tracker.swarm.MemorySwarm` as in the SQLite mode) and applies the same changes in the
same order. This module is the replica's I/O; the record and snapshot formats and their apply
live in :mod:`tracker.swarm_log_state`:

* A state change (a verified announce, a verified report, an operator's ``clear_peer``, and a
  periodic ``gc``) is a record carrying all its apply needs, including the origin's clock
  reading ``now`` (so expiry and the replay window are decided identically everywhere). An
  announce, nearly every change, is packed binary (``_ANN``: fixed fields, then the address,
  app and record bundle); the others are a JSON list behind a length. The changes a replica
  queued meanwhile go out together as **one** entry of the Redis stream ``PREFIX + "log"`` (a
  group commit: one ``XADD`` whose field ``b`` is the records back to back), applied in their
  order within it. One entry per batch, not per change, is what keeps redis-server's CPU near
  15 us per announce. (Entries of the previous, all-JSON format, field ``e``, are still read.)
* A reader task per replica (``XREAD BLOCK``) applies every entry, its own included, **in
  stream order**, on the trio thread. The replica that received a request answers when it
  applies its own entry: the answer reflects every entry before it in the log and none after
  (sequential consistency). The replay guard (:meth:`MemorySwarm.fresh`) is part of the
  apply, so a replay sent to any replica is refused (409) by whichever applies it second: all
  of them agree which copy came first.
* The committer and the reader each speak to Redis on their own connection from trio
  (:mod:`tracker.resp`), not through redis-py in worker threads: a thread hop per call cost
  more tracker CPU than the announces' own work. If Redis fails the reader, it retries every
  ``READ_RETRY`` seconds (``/healthz`` reports the outage); a failed commit fails its batch's
  requests (503).
* Snapshots keep the log bounded and let a replica start: every ``snapshot_every`` seconds one
  replica (``SET NX EX`` lock) serialises its state at the stream id ``S`` it has applied up to
  into ``PREFIX + "log:snap"``, then trims the log to the *previous* snapshot's id (``XTRIM
  MINID``), so a replica up to one period behind still finds its next entries. A starting
  replica loads the snapshot and replays the log after ``S``. A replica that finds the log
  trimmed past its position (it stalled for over a period) reloads from the snapshot.

Size of a snapshot (zlib-compressed JSON plus a binary table): about 150 bytes per swarm
member, 60 per scored peer, and 24 per replay digest remembered (each accepted announce or
report for ``2 * MAX_SKEW`` = 600 s, so 5,000 announces/s hold ~3 M digests, ~72 MB); redis
caps a value at 512 MB, reached near 35,000 announces/s sustained.

What is *not* identical across replicas: the order among peers whose progress changed in the
last ``RANK_REFRESH`` second (each replica re-sorts on its own reads), and ``/v1/stats`` and
``/metrics`` read at different moments or log positions.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

import trio

from .backend import AnnounceAnswer, AnnounceCommit, ReportCommit
from .errors import LogUnavailable, RedisUnavailable
from .quality import PeerQuality
from .resp import TrioRedis
from .swarm_log_state import (
    ReplicaState,
    encode_announce,
    json_record,
    pack_snapshot,
    unpack_snapshot,
)

__all__ = ["LogSwarm"]

log = logging.getLogger(__name__)

#: Seconds a request waits for its own entry to come back through the log before giving up
#: (checked every ``SWEEP_EVERY`` seconds: one timer for all waiting requests, not one each).
APPLY_TIMEOUT = 10.0
SWEEP_EVERY = 0.5
#: ``XREAD BLOCK`` milliseconds (bounds how long cancelling the reader takes).
READ_BLOCK_MS = 500
#: Entries read per ``XREAD``.
READ_COUNT = 2000
#: Entries per ``XADD`` pipeline.
COMMIT_MAX = 2000
#: The reader is unhealthy when its last successful read is older than this (seconds).
HEALTHY_WITHIN = 5.0
#: Seconds the reader waits before trying again after Redis failed it.
READ_RETRY = 0.5
#: Seconds each Redis call may take (plus the ``BLOCK`` time for the reader's).
REDIS_TIMEOUT = 5.0


class _Wait:
    """A request waiting for its own entry to be applied."""

    __slots__ = ("deadline", "done", "error", "expired", "numwant", "result")

    def __init__(self, numwant: int, deadline: float) -> None:
        self.numwant = numwant
        self.deadline = deadline
        self.done = trio.Event()
        self.result: Any = None
        self.error: Exception | None = None
        self.expired = False


def _sid(text: str) -> tuple[int, int]:
    """A stream id as a comparable pair."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class LogSwarm:
    """Swarm state in memory, replicated through a Redis stream (see the module docstring); a
    :class:`tracker.backend.SwarmStore`.

    Args:
        url: ``redis://host:port/db``.
        prefix: key prefix shared by the replicas of one tracker.
        snapshot_every: seconds between snapshot attempts (one replica wins each round).
    """

    def __init__(self, url: str, *, prefix: str = "trk:", snapshot_every: float = 60.0) -> None:
        import redis

        #: this replica's copy of the state, at stream id :attr:`applied`
        self.state = ReplicaState()

        opts: dict[str, Any] = {"socket_connect_timeout": 5.0, "health_check_interval": 30}
        # snapshots, their lock and trimming (rare): redis-py in a worker thread
        self._r: Any = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, **opts)
        # the hot path, from trio: the committer's XADDs and the reader's XREADs
        self._tx = TrioRedis(url, timeout=REDIS_TIMEOUT)
        self._rx = TrioRedis(url, timeout=REDIS_TIMEOUT)
        self.prefix = prefix
        self.stream = prefix + "log"
        self.snapshot_every = snapshot_every
        self.me = secrets.token_hex(6)
        #: the last stream id applied
        self.applied = "0-0"
        self._seq = 0
        self._waiting: dict[int, _Wait] = {}
        #: changes this replica appended and has not applied yet, by sequence number: the
        #: entry, and for an announce the commit it was encoded from (applied as is when its
        #: own entry comes back; the other replicas decode the same values from the entry)
        self._local: dict[int, tuple[bytes, AnnounceCommit | None]] = {}
        #: sequence numbers queued for the next commit (consecutive)
        self._out: list[int] = []
        self._wake = trio.Event()
        self._last_read = 0.0

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        """Redis answers (a network call: run it in a worker thread)."""
        return bool(self._r.ping())

    async def check(self) -> None:
        """Before the reader runs, whether Redis answers; after, whether the reader has heard
        from it lately (no I/O: ``/healthz`` answers at once)."""
        if not self._last_read:
            import redis

            try:
                await trio.to_thread.run_sync(self.ping)
            except redis.exceptions.RedisError as exc:
                raise LogUnavailable(f"Redis of the log {self.stream} failed: {exc}") from exc
            return
        if time.monotonic() - self._last_read > HEALTHY_WITHIN:
            raise LogUnavailable(f"no read from the log {self.stream} for {HEALTHY_WITHIN:g} s")

    def close(self) -> None:
        """Close the redis-py client (the trio connections close with :meth:`run`)."""
        self._r.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Catch up (snapshot, then the log after it), then apply, commit and snapshot until
        cancelled. Requests are served only after ``task_status.started()``."""
        snap = await trio.to_thread.run_sync(self._read_snapshot)
        if snap is not None:
            self._install(snap)
        try:
            await self._catch_up()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._committer)
                nursery.start_soon(self._snapshotter)
                nursery.start_soon(self._sweeper)
                task_status.started()
        finally:
            await self._tx.aclose()
            await self._rx.aclose()

    async def _catch_up(self) -> None:
        while True:
            entries = await self._read(None)
            if not entries:
                return
            self._apply_batch(entries)

    # ------------------------------------------------------------------ submitting changes

    async def announce(self, c: AnnounceCommit) -> AnnounceAnswer | None:
        """Append the announce to the log; its answer once applied here (``None``: replay)."""
        res: AnnounceAnswer | None = await self._submit(encode_announce(c), c.announce.numwant, c)
        return res

    async def report(self, c: ReportCommit) -> bool:
        """Append the report to the log; False if it turned out a replay."""
        r = c.report
        peers = [[e.node_id.hex(), e.bytes, e.rate, e.failures, e.corrupt] for e in r.peers]
        entry = ["r", c.now, c.digest.hex(), c.window, r.node_id.hex(), peers]
        return bool(await self._submit(json_record(entry), 0))

    async def clear_peer(self, node_id: bytes) -> bool:
        """Append an operator's ``clear_peer``; whether the peer had a quality record."""
        return bool(await self._submit(json_record(["c", node_id.hex()]), 0))

    async def gc(self, now: float) -> int:
        """Queue a housekeeping entry: every replica drops the same expired state at the same
        log position (a local, clock-driven gc would make replicas diverge)."""
        self._enqueue(json_record(["g", now]))
        return 0

    async def quality(self, node_id: bytes) -> PeerQuality:
        return self.state.quality(node_id)

    async def stats(self, now: float) -> dict[str, Any]:
        return self.state.stats(now)

    def _enqueue(self, entry: bytes, prepared: AnnounceCommit | None = None) -> int:
        self._seq += 1
        self._local[self._seq] = (entry, prepared)
        self._out.append(self._seq)
        self._wake.set()
        return self._seq

    async def _submit(
        self, entry: bytes, numwant: int, prepared: AnnounceCommit | None = None
    ) -> Any:
        seq = self._enqueue(entry, prepared)
        w = self._waiting[seq] = _Wait(numwant, trio.current_time() + APPLY_TIMEOUT)
        try:
            await w.done.wait()
        finally:
            self._waiting.pop(seq, None)
        if w.error is not None:
            raise LogUnavailable(f"appending to the log {self.stream} failed: {w.error}")
        if w.expired:
            raise LogUnavailable(
                f"this replica did not see its change come back through {self.stream} "
                f"within {APPLY_TIMEOUT:g} s (the change may still apply)"
            )
        return w.result

    async def _sweeper(self) -> None:
        """Give up on requests whose entry did not come back within ``APPLY_TIMEOUT``."""
        while True:
            await trio.sleep(SWEEP_EVERY)
            now = trio.current_time()
            for seq, w in list(self._waiting.items()):  # in submission order: oldest first
                if w.deadline > now:
                    break
                del self._waiting[seq]  # its entry, if it comes, applies with no one waiting
                w.expired = True
                w.done.set()

    async def _committer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._out:
                batch, self._out = self._out[:COMMIT_MAX], self._out[COMMIT_MAX:]
                local = self._local
                try:
                    await self._tx.call(
                        b"XADD",
                        self.stream,
                        b"*",
                        b"o",
                        b"%s:%d" % (self.me.encode(), batch[0]),
                        b"n",
                        len(batch),
                        b"b",
                        b"".join([local[s][0] for s in batch]),
                    )
                except RedisUnavailable as exc:  # every waiter of the batch fails
                    for seq in batch:
                        local.pop(seq, None)  # if it did reach the log, it is decoded there
                        w = self._waiting.get(seq)
                        if w is not None:
                            w.error = exc
                            w.done.set()

    # ------------------------------------------------------------------ applying the log

    async def _read(self, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entries after :attr:`applied` (at most ``READ_COUNT``), waiting up to
        ``block_ms`` for one when there are none (``None``: do not wait)."""
        args: list[bytes | str | int] = [b"XREAD", b"COUNT", READ_COUNT]
        if block_ms is not None:
            args += [b"BLOCK", block_ms]
        args += [b"STREAMS", self.stream, self.applied]
        res = await self._rx.call(*args, extra_time=(block_ms or 0) / 1000)
        self._last_read = time.monotonic()
        if not res:
            return []
        return [(sid, dict(zip(f[::2], f[1::2], strict=True))) for sid, f in res[0][1]]

    async def _reader(self) -> None:
        checked = time.monotonic()
        failing = False  # an outage is logged once, and so is the recovery
        while True:
            try:
                entries = await self._read(READ_BLOCK_MS)
            except RedisUnavailable as exc:  # /healthz turns 503 after HEALTHY_WITHIN
                if not failing:
                    log.warning(
                        "tracker log reader: %s; retrying every %g s", exc.message, READ_RETRY
                    )
                failing = True
                await trio.sleep(READ_RETRY)
                continue
            if failing:
                log.warning("tracker log reader: Redis answers again; catching up")
                failing = False
            if entries:
                self._apply_batch(entries)
            if time.monotonic() - checked >= self.snapshot_every:
                checked = time.monotonic()
                await self._check_trimmed()

    def _apply_batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        me = self.me.encode()
        local, waiting, state = self._local, self._waiting, self.state
        for sid, fields in entries:
            origin, _, seq = fields[b"o"].partition(b":")
            first, n = int(seq), int(fields[b"n"])
            mine = origin == me
            popped = [local.pop(s, None) for s in range(first, first + n)] if mine else []
            own = [c for c in popped if c is not None]
            if mine and len(own) == n:
                # our own batch: applied from what it was encoded from (JSON round-trips the
                # values exactly, so the other replicas apply the very same change)
                for i, (e, prepared) in enumerate(own):
                    w = waiting.get(first + i)
                    if prepared is None:
                        (result,) = state.apply_records(
                            e, [w.numwant if w is not None else 0], self.stream
                        )
                    else:
                        result = state.announce(prepared)
                    if w is not None:
                        w.result = result
                        w.done.set()
            else:  # another replica's batch (or ours, if its XADD "failed" yet reached the log)
                ws = [waiting.get(first + i) if mine else None for i in range(n)]
                if b"b" in fields:
                    numwants = [w.numwant if w else 0 for w in ws]
                    results = state.apply_records(fields[b"b"], numwants, self.stream)
                else:  # the previous format: one JSON list of lists
                    changes = json.loads(fields[b"e"])
                    results = [
                        state.apply_json(e, w.numwant if w else 0, self.stream)
                        for e, w in zip(changes, ws, strict=True)
                    ]
                for w, result in zip(ws, results, strict=True):
                    if w is not None:
                        w.result = result
                        w.done.set()
            self.applied = sid.decode()

    # ------------------------------------------------------------------ snapshots

    async def _snapshotter(self) -> None:
        while True:
            await trio.sleep(self.snapshot_every)
            await self.snapshot()

    async def snapshot(self) -> bool:
        """Write a snapshot and trim the log, if no other replica did this round; whether
        this replica wrote one."""
        lock = self.prefix + "log:snaplock"
        ttl = max(1, int(self.snapshot_every * 0.8))
        if not await trio.to_thread.run_sync(lambda: self._r.set(lock, self.me, nx=True, ex=ttl)):
            return False
        state = self.state.capture(self.applied)  # on the trio thread: nothing changes meanwhile
        await trio.to_thread.run_sync(self._write_snapshot, state)
        return True

    async def _check_trimmed(self) -> None:
        trimmed = await trio.to_thread.run_sync(self._r.get, self.prefix + "log:trimmed")
        if trimmed is not None and _sid(self.applied) < _sid(trimmed.decode()):
            # entries this replica never applied are gone: start over from the snapshot
            snap = await trio.to_thread.run_sync(self._read_snapshot)
            if snap is not None:
                self._install(snap)

    def _write_snapshot(self, state: dict[str, Any]) -> None:
        blob = pack_snapshot(state)
        p = self.prefix
        previous = self._r.get(p + "log:snapid")
        with self._r.pipeline(transaction=True) as pipe:
            pipe.set(p + "log:snap", blob)
            pipe.set(p + "log:snapid", state["id"])
            pipe.execute()
        if previous is not None:
            self._r.xtrim(self.stream, minid=previous.decode(), approximate=False)
            self._r.set(p + "log:trimmed", previous)

    def _read_snapshot(self) -> dict[str, Any] | None:
        blob = self._r.get(self.prefix + "log:snap")
        return None if blob is None else unpack_snapshot(blob)

    def _install(self, snap: dict[str, Any]) -> None:
        self.state = ReplicaState.from_snapshot(snap)
        self.applied = snap["id"]
