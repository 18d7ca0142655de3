"""The fetching half of the swarm's trio shell: ask the peers we dial for chunks.

Theory of operation
-------------------
``fetch`` runs one task per peer, each keeping the scheduler's (scheduler.py) pipeline for that
peer full; every piece is checked with blake3 before ``deliver``; a peer that sends a bad chunk
twice is banned by node id (``banned``: not fetched from nor served again, on any address);
one that stalls or breaks the protocol is dropped; one whose handshake proves it is this node
(our own address handed back by a tracker or the DHT) is closed at once; each says why in its
:class:`PeerStats` ``error``, and ``why_no_peer`` tells it when peers gave too little. Their
requests go to others; endgame duplicates that lose the race are cancelled. With a
:class:`CdnSource`, the CDN is one more source in the same schedule. ``fetch`` returns the
chunks no peer could give, for the CDN.

Every network wait is bounded by a cancel scope.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from ..errors import P2PNodeError
from ..identity import peer_node_id
from ..ratelimit import RateLimiter
from ..release import manifest as M
from ..release.chunker import hash_chunk
from ..release.delta import pieces
from . import wire as W
from .links import CONNECTION_ENDED, Link, PeerFailed, dial
from .peer import PeerSession
from .scheduler import CDN, Scheduler
from .shell import Shell

__all__ = [
    "NOT_IN_SWARM",
    "OWN_NODE",
    "CdnSource",
    "Deliver",
    "Fetching",
    "PeerStats",
    "why_no_peer",
]

log = logging.getLogger(__name__)

#: The swarm phase is not ended before this: the peers handed in start connecting.
START_GRACE = 0.25
MAX_BAD_CHUNKS = 2
#: Why a peer gave nothing, as its PeerStats.error says. A tracker or the DHT may hand a node
#: its own address (or another process may share its identity): the TLS handshake proves the
#: node id, and a fetch never asks itself.
OWN_NODE = "this is our own node (same node id)"
NOT_IN_SWARM = "it does not have this release"
#: How many peers ``why_no_peer`` names.
PEERS_NAMED = 5

Deliver = Callable[[bytes, bytes], Awaitable[None]]  # (chunk id, verified bytes)


@dataclass
class PeerStats:
    """What this node saw of one peer: the tracker's peer-quality report carries these."""

    address: str
    node_id: bytes = b""
    bytes: int = 0
    chunks: int = 0
    corrupt: int = 0
    failures: int = 0
    seconds: float = 0.0
    error: str = ""
    connect_s: float = 0.0  # TCP + TLS handshake: about two round trips
    response_s: float = 0.0  # summed request-to-piece times (queueing at the peer included)
    responses: int = 0
    opened: float = 0.0  # (trio clock) when we started on this peer
    first_piece_s: float | None = None  # from ``opened`` to its first piece: a swarm's start-up

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def latency_ms(self) -> float:
        """Mean time from a request to its piece: what a chunk costs waiting on this peer."""
        return 1000 * self.response_s / self.responses if self.responses else 0.0


def why_no_peer(stats: Mapping[str, PeerStats]) -> str:
    """What each peer of a fetch that ended short did, for the error that says chunks could
    not be had from any peer (a peer with no error gave what it had)."""
    if not stats:
        return "no peer was found"
    told = [
        f"{addr}: {st.error or f'gave {st.chunks} chunks'}"
        for addr, st in sorted(stats.items(), key=lambda kv: (not kv[1].error, kv[0]))
    ]
    more = len(told) - PEERS_NAMED
    return "; ".join(told[:PEERS_NAMED]) + (f"; and {more} more" if more > 0 else "")


@dataclass
class CdnSource:
    """The CDN as one more source of a fetch, scheduled with the peers (scheduler.py): the
    install builds it around its CDN fetcher.

    ``fetch(ids, take)`` fetches those chunks and awaits ``take(chunk id, verified bytes)``
    for each as it lands, raising a P2PNodeError for what it could not get; ``deliver``
    stores a chunk the scheduler took (the fetch's ``deliver`` is for peers' chunks, so the
    two can be counted apart); ``depth`` is how many chunks may be in flight at the CDN.
    """

    fetch: Callable[[list[bytes], Deliver], Awaitable[None]]
    deliver: Deliver
    depth: int = 8
    error: P2PNodeError | None = None  # why the CDN stopped being a source, if it did


@dataclass
class _Fetch:
    manifest: M.Manifest
    ids: list[bytes]
    sched: Scheduler
    deliver: Deliver
    index: dict[bytes, int] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    finished: trio.CancelScope | None = None
    connecting: int = 0  # peers that have not shown a bitfield yet
    shown: set[str] = field(default_factory=set)
    active: set[str] = field(default_factory=set)  # addresses with a live fetch task

    _seen: tuple[int, int] = (-1, 0)  # (scheduler version, connecting) last woken for

    def shown_by(self, peer: str) -> None:
        """The peer showed its bitfield, or its task ended: it is no longer connecting."""
        if peer not in self.shown:
            self.shown.add(peer)
            self.connecting -= 1

    def sync(self) -> None:
        """Wake the tasks waiting on ``changed`` if the scheduler or the peers connecting
        changed since they were last woken. Only then: tasks that woke each other for
        nothing would spin, and each wake-up that changes nothing wakes no one."""
        now = (self.sched.version, self.connecting)
        if now != self._seen:
            self._seen = now
            self.poke()

    def poke(self) -> None:
        """Wake every task waiting on ``changed`` (take it before acting, then wait on it)."""
        self.changed.set()
        self.changed = trio.Event()


async def wait_for(changed: trio.Event, deadline: float) -> None:
    """Until ``changed`` is set or ``deadline`` (the scheduler's, for what only time moves)."""
    with trio.move_on_at(deadline):
        await changed.wait()


class Fetching(Shell):
    """Fetching chunks from peers, and from the CDN beside them (see the module)."""

    async def fetch(
        self,
        manifest: M.Manifest,
        wanted: Sequence[bytes],
        peers: Sequence[tuple[str, int]],
        deliver: Deliver,
        stats: dict[str, PeerStats] | None = None,
        more_peers: trio.MemoryReceiveChannel[tuple[str, int]] | None = None,
        cdn: CdnSource | None = None,
    ) -> set[bytes]:
        """Fetch chunk ids ``wanted`` of ``manifest`` from ``peers``; returns those left over.

        ``more_peers`` brings peers discovered while the fetch runs (the DHT or the tracker
        answering late); each new address is connected to as it arrives, up to
        ``max_connections`` peers in all. With ``cdn``, chunks no peer has and requests that
        miss their deadline come from the CDN meanwhile (scheduler.py)."""
        unique = pieces(manifest)  # chunks, then patches: both are fetched alike
        ids = list(unique)
        index = {cid: i for i, cid in enumerate(ids)}
        sched = Scheduler(
            list(unique.values()),
            (index[c] for c in wanted if c in index),
            now=trio.current_time(),
            leecher_wait=self.leecher_wait,
        )
        job = _Fetch(manifest, ids, sched, deliver, index)
        stats = stats if stats is not None else {}
        if sched.finished:
            return set()
        async with trio.open_nursery() as nursery:
            job.finished = nursery.cancel_scope  # cancelled when the last chunk lands

            def add(host: str, port: int) -> None:
                addr = f"{host}:{port}"
                st = stats.get(addr)
                if (
                    addr in job.active
                    or len(job.active) >= self.max_connections
                    or (st is not None and st.corrupt >= MAX_BAD_CHUNKS)  # banned
                ):
                    return
                job.active.add(addr)
                job.shown.discard(addr)  # (again) connecting
                job.connecting += 1
                job.sync()
                stats[addr] = st or PeerStats(addr)
                nursery.start_soon(self._fetch_from, job, host, port, stats[addr])

            for host, port in peers:
                add(host, port)
            if more_peers is not None:
                nursery.start_soon(self._take_more_peers, more_peers, add)
            nursery.start_soon(self._watch, job)
            if cdn is not None:
                sched.enable_cdn(trio.current_time())
                nursery.start_soon(self._feed_cdn, job, cdn)
            self._fetching[manifest.id] = add
            try:
                await trio.sleep_forever()  # until the last chunk lands or peers run dry
            finally:
                if self._fetching.get(manifest.id) is add:  # (a shared node: not another's)
                    del self._fetching[manifest.id]
        return {ids[i] for i in sched.missing}

    @staticmethod
    async def _take_more_peers(
        channel: trio.MemoryReceiveChannel[tuple[str, int]], add: Callable[[str, int], None]
    ) -> None:
        async with channel:
            async for host, port in channel:
                add(host, port)

    async def _watch(self, job: _Fetch) -> None:
        """End the fetch when peers can give no more (``Scheduler.peers_exhausted``), or
        nothing has arrived for ``stall_timeout``. The rest then comes from the CDN, per the
        install's policy. Looks first after ``START_GRACE`` (peers handed in start
        connecting), then whenever the fetch changes or its phase deadline comes."""
        sched = job.sched
        await trio.sleep(START_GRACE)
        while True:
            now = trio.current_time()
            if (
                sched.finished
                or sched.peers_exhausted(now, job.connecting)
                or now - sched.last_progress > self.stall_timeout
            ):
                break
            await wait_for(job.changed, sched.phase_deadline(self.stall_timeout))
        assert job.finished is not None
        job.finished.cancel()

    async def _feed_cdn(self, job: _Fetch, cdn: CdnSource) -> None:
        """Hand the CDN what the scheduler gives it, a batch at a time, until the CDN fails
        (then it is no longer a source; the install's bulk CDN pass after the swarm phase
        reports why, if chunks are left). Looks again when the fetch changes, or when the
        scheduler says time alone may give the CDN more (``next_cdn_change``)."""
        sched = job.sched
        async with trio.open_nursery() as batches:
            while cdn.error is None:
                now = trio.current_time()
                sched.take_cancels(CDN)  # a peer was first: the CDN's copy will be a duplicate
                room = cdn.depth - sched.inflight(CDN)
                batch = sched.cdn_requests(now, room)
                if batch:
                    batches.start_soon(self._cdn_batch, job, cdn, batch)
                job.sync()
                deadline = sched.next_cdn_change(now) if room > len(batch) else math.inf
                await wait_for(job.changed, deadline)

    async def _cdn_batch(self, job: _Fetch, cdn: CdnSource, batch: list[int]) -> None:
        sched = job.sched

        async def take(cid: bytes, data: bytes) -> None:
            i = job.index.get(cid)
            if i is None or not sched.received(CDN, i, len(data), trio.current_time()):
                job.sync()
                return  # a peer's copy landed first
            job.sync()
            await cdn.deliver(cid, data)
            if sched.finished and job.finished is not None:
                job.finished.cancel()

        try:
            await cdn.fetch([job.ids[i] for i in batch], take)
        except P2PNodeError as exc:
            if cdn.error is None:
                cdn.error = exc
                log.info("the CDN is no longer a source of this fetch: %s", exc)
                sched.disable_cdn()
        finally:
            for i in batch:
                if i in sched.missing:
                    sched.timed_out(CDN, i)  # back to the pool (no-op once disabled)
            job.sync()  # (the CDN has room again)

    async def _fetch_from(self, job: _Fetch, host: str, port: int, st: PeerStats) -> None:
        addr = f"{host}:{port}"
        t0 = st.opened = trio.current_time()
        try:
            tls = await dial(host, port, self._client_ctx)
            st.connect_s = trio.current_time() - t0
            st.node_id = peer_node_id(tls)
            if st.node_id == self.identity.node_id:
                refused = OWN_NODE
            elif st.node_id in self.banned:
                refused = "banned: it sent chunks that fail blake3 before"
            else:
                refused = ""
            if refused:
                st.error = refused
                await trio.aclose_forcefully(tls)
                return
            s = PeerSession(
                self.identity.node_id,
                self.listen_port,
                now=trio.current_time(),
                expected_id=st.node_id,
                idle_timeout=self.idle_timeout,
                hello_timeout=self.hello_timeout,
            )
            link = Link(
                tls, s, st.node_id, RateLimiter(self.peer_download_rate), self.write_timeout
            )
            now = trio.current_time()
            await link.send(s.hello(now) + s.join(job.manifest.id, len(job.ids), now))
            link.manifests.add(job.manifest.id)
            self.links.add(link)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.writer)
                    nursery.start_soon(self._ask, job, link, addr)
                    await self._fetch_loop(job, link, addr, st)
                    nursery.cancel_scope.cancel()
            finally:
                self.links.discard(link)
                # Close now, not when collected: the peer's upload slot goes to someone else.
                await trio.aclose_forcefully(tls)
        except* (*CONNECTION_ENDED, trio.TooSlowError, PeerFailed) as group:
            exc = group.exceptions[0]
            st.failures += 1
            st.error = str(exc) or type(exc).__name__
        finally:
            job.shown_by(addr)
            job.active.discard(addr)
            # What it did not deliver goes back to the pool.
            job.sched.remove_peer(addr, trio.current_time())
            job.sync()
            st.seconds += trio.current_time() - t0

    async def _ask(self, job: _Fetch, link: Link, addr: str) -> None:
        """Keep the peer's pipeline full: cancel what another peer answered first (endgame),
        request what the scheduler gives this peer. Looks again when the fetch changes (a
        piece lands, a request is given back, the peer unchokes us) or when the scheduler
        says time alone may give this peer more (``Scheduler.next_change``)."""
        s, sched, mid = link.session, job.sched, job.manifest.id
        while True:
            now = trio.current_time()
            out = b""
            for i in sched.take_cancels(addr):
                out += s.cancel(mid, i, now)
            deadline = math.inf
            if addr in sched.peers and not s.peer_choking:
                for i in sched.next_requests(addr, now):
                    out += s.request(mid, i, now)[1]
                if sched.inflight(addr) < sched.depth(addr, now):
                    deadline = sched.next_change(addr, now)  # room: what time may bring
            job.sync()
            changed = job.changed  # (taken before sending: a change meanwhile wakes us)
            await link.send(out)
            await wait_for(changed, deadline)

    async def _fetch_loop(self, job: _Fetch, link: Link, addr: str, st: PeerStats) -> None:
        """Read the peer's messages and act on them; the requests are ``_ask``'s."""
        tls, s, sched, mid = link.tls, link.session, job.sched, job.manifest.id
        last_piece = trio.current_time()  # a busy peer answers late but keeps answering
        while True:
            now = trio.current_time()
            deadline = min(s.get_timer(), now + self.request_timeout)
            with trio.move_on_at(deadline):
                received = await tls.receive_some(1 << 20)
                s.receive_data(received, trio.current_time())
                if not received:
                    raise PeerFailed("the peer closed the connection")
                await link.cap.acquire(len(received))
                await self.download_limiter.acquire(len(received))
            now = trio.current_time()
            if s.overdue(now, self.request_timeout) and now - last_piece > self.request_timeout:
                raise PeerFailed(f"no answer within {self.request_timeout:g}s")
            await link.send(s.handle_timer(trio.current_time()))
            while (ev := s.next_event()) is not None:
                now = trio.current_time()
                if isinstance(ev, W.Bitfield) and ev.manifest == mid:  # (its size checked)
                    if ev.count == 0:  # the peer does not know this manifest
                        signed = self.signed.get(mid)
                        # Show it, once: the peer may hold an earlier build's chunks.
                        if signed is not None and (push := s.show(mid, signed, now)):
                            await link.send(push)
                            continue
                        job.shown_by(addr)
                        st.error = NOT_IN_SWARM
                        return
                    job.shown_by(addr)
                    sched.bitfield(addr, bytes(ev.bits), earlier_build=mid in s.shown)
                elif isinstance(ev, W.Hello) and s.peer_can(b"origin"):
                    sched.add_origin(addr)
                elif isinstance(ev, W.Unchoke):
                    job.poke()  # our requests may go now
                elif isinstance(ev, W.Have) and ev.manifest == mid:
                    sched.have(addr, ev.index)
                elif isinstance(ev, W.Piece):
                    assert s.answered is not None  # a piece comes out only as an answer
                    last_piece = now
                    st.response_s += now - s.answered.sent_at
                    st.responses += 1
                    if st.first_piece_s is None:
                        st.first_piece_s = now - st.opened
                    await self._take(job, ev, addr, st)
                elif isinstance(ev, W.Reject):  # (one of ours: the session checked)
                    sched.rejected(addr, ev.index, bytes(ev.reason), now)
                elif isinstance(ev, (W.Join, W.ManifestPush, W.Request)):
                    # This node serves only on connections it accepted (the peer gets our
                    # chunks by dialling us, or by our dial-back).
                    with trio.fail_after(self.request_timeout):  # a peer that does not read
                        await link.send(s.decline(ev, now))
                elif isinstance(ev, W.Goodbye):
                    return
            job.sync()

    async def _take(self, job: _Fetch, piece: W.Piece, addr: str, st: PeerStats) -> None:
        i = piece.index  # (the session checked it is what this request asked for)
        expected = job.ids[i]
        data = bytes(piece.data)
        if piece.chunk_id != expected or hash_chunk(data) != expected:
            st.corrupt += 1
            job.sched.failed(addr, i)
            if st.corrupt >= MAX_BAD_CHUNKS:
                self.ban(st.node_id)  # by node id: its other addresses and later fetches too
                raise PeerFailed(f"sent {st.corrupt} chunks that fail blake3: banned")
            return
        now = trio.current_time()
        self.choker.downloaded(st.node_id, len(data), now)
        if not job.sched.received(addr, i, len(data), now):
            return  # a duplicate (endgame): another peer's copy was first
        st.bytes += len(data)
        st.chunks += 1
        job.sync()  # the peer's pipeline has room: refill it while the chunk is written
        await job.deliver(expected, data)
        if job.sched.finished and job.finished is not None:
            job.finished.cancel()  # every chunk is here: close all peer connections
