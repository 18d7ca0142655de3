"""The swarm's trio shell: serve chunks to peers, and fetch chunks from them.

Theory of operation
-------------------
Each connection is TLS 1.3 with both node ids proven (``identity``), then a
:class:`~p2pnode.swarm.peer.PeerSession` checks the protocol; this module only moves bytes and
makes the few decisions a first swarm needs, which will move into a sans-IO scheduler and
choker as they grow (docs/protocol.md):

* **Serving** (``serve``): every manifest this node ``offer``s is answered with its availability
  bitfield (from :class:`~p2pnode.stage.LocalChunks`, so an unfinished install and the kept
  earlier builds of an app serve too); requests are served from verified local reads while an
  upload slot is free, else rejected.
* **Fetching** (``fetch``): one task per peer, each keeping a short pipeline of requests for
  chunks that peer has, rarest first among the peers connected; every piece is checked with
  blake3 before ``deliver``; a peer that sends a bad chunk twice, stalls, or breaks the protocol
  is dropped and its requests go to others. ``fetch`` returns the chunks no peer could give, for
  the CDN.

Every network wait is bounded by a cancel scope.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from .. import manifest as M
from ..chunker import hash_chunk
from ..errors import ProtocolError, UsageError
from ..identity import NodeIdentity, client_context, peer_node_id, server_context
from ..ratelimit import RateLimiter
from ..stage import LocalChunks
from . import wire as W
from .peer import PeerSession

__all__ = ["PeerStats", "SwarmNode", "parse_peer"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CONNECT_ATTEMPTS = 4  # over ~3 s of backoff
#: A request unanswered this long (a stalled or slow-dripping peer) drops the peer.
REQUEST_TIMEOUT = 10.0
PIPELINE = 4
#: No chunk from any peer for this long: give the rest to the CDN (p2p-first's deadline).
STALL_TIMEOUT = 15.0
WATCH_INTERVAL = 0.25
#: How long a chunk an origin refused as "frugal" is not asked of it again.
FRUGAL_RETRY = 1.0
MAX_BAD_CHUNKS = 2
UPLOAD_SLOTS = 16
#: Peers served at once; more are refused at accept (a flood of connections costs nothing).
MAX_CONNECTIONS = 64

Deliver = Callable[[bytes, bytes], Awaitable[None]]  # (chunk id, verified bytes)


def parse_peer(text: str, *, listen: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); a listen address may use port 0 (any free port)."""
    host, _, port = text.rpartition(":")
    low = 0 if listen else 1
    if not host or not port.isdigit() or not low <= int(port) < 65536:
        raise UsageError(f"{text!r} is not HOST:PORT", fix="write addresses as 10.0.0.5:6881")
    return host.strip("[]"), int(port)


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

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Fetch:
    manifest: M.Manifest
    ids: list[bytes]
    wanted: set[int]
    deliver: Deliver
    claimed: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    availability: dict[str, bytes] = field(default_factory=dict)  # peer -> bitfield
    changed: trio.Event = field(default_factory=trio.Event)
    finished: trio.CancelScope | None = None
    connecting: int = 0  # peers that have not shown a bitfield yet
    deferred: dict[tuple[str, int], float] = field(default_factory=dict)  # not before
    shown: set[str] = field(default_factory=set)

    def shown_by(self, peer: str) -> None:
        """The peer showed its bitfield, or its task ended: it is no longer connecting."""
        if peer not in self.shown:
            self.shown.add(peer)
            self.connecting -= 1

    def has(self, peer: str, index: int) -> bool:
        bits = self.availability.get(peer, b"")
        return index >> 3 < len(bits) and bool(bits[index >> 3] & (0x80 >> (index & 7)))

    def next_for(self, peer: str, now: float = 0.0) -> int | None:
        """The rarest unclaimed chunk this peer has; ties broken at random, so that leechers
        starting together fetch different chunks and can then trade them."""
        best: list[int] = []
        best_count = 1 << 30
        for i in self.wanted - self.claimed - self.done:
            if self.has(peer, i) and self.deferred.get((peer, i), 0.0) <= now:
                count = sum(1 for p in self.availability if self.has(p, i))
                if count < best_count:
                    best, best_count = [i], count
                elif count == best_count:
                    best.append(i)
        return random.choice(best) if best else None

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class _Link:
    """One live connection: its session, the swarms it is in, and a writer task's queue.

    Everything sent goes through the queue, so ``have`` messages can be pushed from outside the
    connection's own loop; haves are dropped when a slow peer's queue is full (it will ask).
    """

    def __init__(self, tls: trio.SSLStream[trio.SocketStream], session: PeerSession) -> None:
        self.tls = tls
        self.session = session
        self.manifests: set[bytes] = set()
        self.out, self._out = trio.open_memory_channel[bytes](LINK_QUEUE)

    async def writer(self) -> None:
        async for data in self._out:
            await self.tls.send_all(data)

    async def send(self, data: bytes) -> None:
        if data:
            await self.out.send(data)

    def send_soon(self, data: bytes) -> None:
        try:
            self.out.send_nowait(data)
        except trio.WouldBlock:
            pass


#: Frames queued per connection before haves are dropped and answers wait.
LINK_QUEUE = 32


class SwarmNode:
    def __init__(
        self,
        identity: NodeIdentity,
        local: LocalChunks,
        listen_port: int = 0,
        *,
        idle_timeout: float = 120.0,
        request_timeout: float = REQUEST_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        upload_limiter: RateLimiter | None = None,
        download_limiter: RateLimiter | None = None,
        frugal: bool = False,
    ) -> None:
        self.identity = identity
        self.local = local
        self.listen_port = listen_port
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0
        self.frugal = frugal
        self._sent: dict[bytes, list[int]] = {}  # manifest id -> uploads per chunk index
        self._unsent: dict[bytes, int] = {}  # manifest id -> chunks never uploaded
        self.upload_limiter = upload_limiter or RateLimiter(None)
        self.download_limiter = download_limiter or RateLimiter(None)
        self.offers: dict[bytes, list[bytes]] = {}  # manifest id -> unique chunk ids
        self.index: dict[bytes, dict[bytes, int]] = {}  # manifest id -> chunk id -> index
        self.manifests: dict[bytes, M.Manifest] = {}
        self.links: set[_Link] = set()
        self.uploaded = 0
        self._slots = trio.Semaphore(UPLOAD_SLOTS)
        self._server_ctx = server_context(identity)
        self._client_ctx = client_context(identity)

    def offer(self, manifest: M.Manifest) -> None:
        self.manifests[manifest.id] = manifest
        self.offers[manifest.id] = list(manifest.unique_chunks())
        self.index[manifest.id] = {cid: i for i, cid in enumerate(self.offers[manifest.id])}

    def have(self, chunk_id: bytes) -> None:
        """A chunk just landed here: tell every connected peer in a swarm that has it."""
        now = trio.current_time()
        for link in list(self.links):
            for mid in link.manifests:
                i = self.index.get(mid, {}).get(chunk_id)
                if i is not None and link.session.state.value == "open":
                    link.send_soon(link.session.send(W.Have(mid, i), now))

    # -- serving ----------------------------------------------------------------------------

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept peers on ``host:port`` until cancelled; reports the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.listen_port = self.listen_port or bound
        task_status.started(bound)
        await trio.serve_listeners(self._serve_one, listeners)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            with trio.move_on_after(CONNECT_TIMEOUT) as scope:
                tls = trio.SSLStream(stream, self._server_ctx, server_side=True)
                await tls.do_handshake()
            if scope.cancelled_caught:
                return
            session = PeerSession(
                self.identity.node_id,
                self.listen_port,
                now=trio.current_time(),
                expected_id=peer_node_id(tls),
                idle_timeout=self.idle_timeout,
            )
            link = _Link(tls, session)
            await tls.send_all(session.hello(trio.current_time()))
            self.links.add(link)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.writer)
                    await self._serve_loop(link)
                    nursery.cancel_scope.cancel()
            finally:
                self.links.discard(link)
        except* _CONNECTION_ENDED as group:  # (a writer task's failure arrives grouped)
            log.debug("peer connection ended: %r", group.exceptions[0])
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_loop(self, link: _Link) -> None:
        tls, s = link.tls, link.session
        while True:
            with trio.move_on_at(s.get_timer()):
                data = await tls.receive_some(1 << 20)
                s.receive_data(data, trio.current_time())
                if not data:
                    return
            out = s.handle_timer(trio.current_time())
            while (ev := s.next_event()) is not None:
                now = trio.current_time()
                if isinstance(ev, W.Hello):
                    out += s.send(W.Unchoke(), now)
                elif isinstance(ev, W.Join):
                    link.manifests.add(ev.manifest)
                    out += s.send(self._bitfield(ev.manifest), now)
                elif isinstance(ev, W.Request):
                    await link.send(out)
                    out = await self._answer(s, ev)
                elif isinstance(ev, W.Goodbye):
                    return
            await link.send(out)

    def _bitfield(self, mid: bytes) -> W.Bitfield:
        manifest = self.manifests.get(mid)
        if manifest is None:
            return W.Bitfield(mid, 0, b"")  # not a swarm we take part in
        return W.Bitfield(mid, len(self.offers[mid]), self.local.availability(manifest))

    def _frugal_refuses(self, mid: bytes, index: int) -> bool:
        """Origin-frugal seeding: while some chunk of this swarm has never been uploaded,
        refuse to upload one again. The refused leecher takes it from the peer that got it
        (its ``have`` says so), so the origin's upload goes to chunks the swarm lacks."""
        if not self.frugal:
            return False
        counts = self._sent.setdefault(mid, [0] * len(self.offers[mid]))
        return counts[index] > 0 and self._unsent.get(mid, len(counts)) > 0

    def _count_sent(self, mid: bytes, index: int) -> None:
        if self.frugal:
            counts = self._sent.setdefault(mid, [0] * len(self.offers[mid]))
            if counts[index] == 0:
                self._unsent[mid] = self._unsent.get(mid, len(counts)) - 1
            counts[index] += 1

    async def _answer(self, s: PeerSession, req: W.Request) -> bytes:
        ids = self.offers.get(req.manifest)
        data = None
        if (
            ids is not None
            and req.index < len(ids)
            and self._frugal_refuses(req.manifest, req.index)
        ):
            return s.send(
                W.Reject(req.manifest, req.index, req.rid, b"frugal"), trio.current_time()
            )
        if ids is not None and req.index < len(ids) and self._slots.value > 0:
            async with self._slots:
                data = await trio.to_thread.run_sync(self.local.read, ids[req.index])
        now = trio.current_time()
        if data is None:
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"unavailable"), now)
        await self.upload_limiter.acquire(len(data))
        self.uploaded += len(data)
        self._count_sent(req.manifest, req.index)
        assert ids is not None
        return s.send(W.Piece(req.manifest, req.index, req.rid, ids[req.index], data), now)

    # -- fetching ---------------------------------------------------------------------------

    async def fetch(
        self,
        manifest: M.Manifest,
        wanted: Sequence[bytes],
        peers: Sequence[tuple[str, int]],
        deliver: Deliver,
        stats: dict[str, PeerStats] | None = None,
    ) -> set[bytes]:
        """Fetch chunk ids ``wanted`` of ``manifest`` from ``peers``; returns those left over."""
        ids = list(manifest.unique_chunks())
        index = {cid: i for i, cid in enumerate(ids)}
        job = _Fetch(manifest, ids, {index[c] for c in wanted if c in index}, deliver)
        stats = stats if stats is not None else {}
        if not job.wanted:
            return set()
        async with trio.open_nursery() as nursery:
            job.finished = nursery.cancel_scope  # cancelled when the last chunk lands
            job.connecting = len(peers)
            for host, port in peers:
                addr = f"{host}:{port}"
                stats[addr] = stats.get(addr) or PeerStats(addr)
                nursery.start_soon(self._fetch_from, job, host, port, stats[addr])
            nursery.start_soon(self._watch, job)
        return {ids[i] for i in job.wanted - job.done}

    async def _watch(self, job: _Fetch) -> None:
        """End the fetch when peers can give no more: no connected peer has a missing chunk
        and none is still connecting, or nothing has arrived for ``stall_timeout`` (the rest
        then comes from the CDN, per the install's policy)."""
        last_done, last_progress = len(job.done), trio.current_time()
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = trio.current_time()
            if len(job.done) != last_done:
                last_done, last_progress = len(job.done), now
            missing = job.wanted - job.done
            if not missing:
                break
            offered = job.claimed or any(
                job.has(p, i) for p in list(job.availability) for i in missing
            )
            if (not offered and job.connecting == 0) or now - last_progress > self.stall_timeout:
                break
        assert job.finished is not None
        job.finished.cancel()

    async def _connect(self, host: str, port: int) -> trio.SSLStream[trio.SocketStream]:
        """TLS to a peer, retried with backoff: peers of a swarm start at about the same time,
        and one that is not listening yet should not be written off."""
        delay = 0.2
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
                    tls = trio.SSLStream(stream, self._client_ctx, server_hostname="p2pnode-peer")
                    await tls.do_handshake()
                return tls
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                await trio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    async def _fetch_from(self, job: _Fetch, host: str, port: int, st: PeerStats) -> None:
        addr = f"{host}:{port}"
        t0 = trio.current_time()
        mine: set[int] = set()
        try:
            tls = await self._connect(host, port)
            st.node_id = peer_node_id(tls)
            if st.node_id == self.identity.node_id:
                return  # ourselves
            s = PeerSession(
                self.identity.node_id,
                self.listen_port,
                now=trio.current_time(),
                expected_id=st.node_id,
                idle_timeout=self.idle_timeout,
            )
            await tls.send_all(
                s.hello(trio.current_time()) + s.send(W.Join(job.manifest.id), trio.current_time())
            )
            link = _Link(tls, s)
            link.manifests.add(job.manifest.id)
            self.links.add(link)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.writer)
                    await self._fetch_loop(job, link, addr, st, mine)
                    nursery.cancel_scope.cancel()
            finally:
                self.links.discard(link)
        except* (*_CONNECTION_ENDED, trio.TooSlowError, _PeerFailed) as group:
            exc = group.exceptions[0]
            st.failures += 1
            st.error = str(exc) or type(exc).__name__
        finally:
            job.shown_by(addr)
            job.claimed -= mine  # give back what this peer did not deliver
            job.availability.pop(addr, None)
            job.notify()
            st.seconds += trio.current_time() - t0

    async def _fetch_loop(
        self, job: _Fetch, link: _Link, addr: str, st: PeerStats, mine: set[int]
    ) -> None:
        tls, s = link.tls, link.session
        inflight: dict[int, int] = {}  # rid -> index
        last_piece = trio.current_time()  # a busy peer answers late but keeps answering
        while True:
            now = trio.current_time()
            out = b""
            if addr in job.availability and not s.peer_choking:
                while len(inflight) < PIPELINE:
                    i = job.next_for(addr, now)
                    if i is None:
                        break
                    job.claimed.add(i)
                    mine.add(i)
                    rid, data = s.request(job.manifest.id, i, now)
                    inflight[rid] = i
                    out += data
            await link.send(out)
            deadline = min(s.get_timer(), now + self.request_timeout)
            if len(inflight) < PIPELINE:
                # Room in the pipeline: look again soon, as claims are given back and
                # deferrals end without anything arriving on this connection.
                deadline = min(deadline, now + WATCH_INTERVAL)
            with trio.move_on_at(deadline):
                received = await tls.receive_some(1 << 20)
                s.receive_data(received, trio.current_time())
                if not received:
                    raise _PeerFailed("the peer closed the connection")
                await self.download_limiter.acquire(len(received))
            now = trio.current_time()
            if s.overdue(now, self.request_timeout) and now - last_piece > self.request_timeout:
                raise _PeerFailed(f"no answer within {self.request_timeout:g}s")
            await link.send(s.handle_timer(trio.current_time()))
            while (ev := s.next_event()) is not None:
                if isinstance(ev, W.Bitfield) and ev.manifest == job.manifest.id:
                    if ev.count not in (0, len(job.ids)):
                        raise _PeerFailed("bitfield size does not match the manifest")
                    job.availability[addr] = bytes(ev.bits)
                    job.shown_by(addr)
                    job.notify()
                    if ev.count == 0:
                        return  # the peer is not in this swarm
                elif isinstance(ev, W.Have) and ev.manifest == job.manifest.id:
                    bits = bytearray(job.availability.get(addr, b""))
                    if ev.index < len(job.ids) and ev.index >> 3 < len(bits):
                        bits[ev.index >> 3] |= 0x80 >> (ev.index & 7)
                        job.availability[addr] = bytes(bits)
                elif isinstance(ev, W.Piece):
                    last_piece = trio.current_time()
                    i = inflight.pop(ev.rid)
                    await self._take(job, ev, i, st)
                    mine.discard(i)
                    job.claimed.discard(i)
                elif isinstance(ev, W.Reject):
                    i = inflight.pop(ev.rid)
                    mine.discard(i)
                    job.claimed.discard(i)
                    if ev.reason == b"frugal":  # an origin saving upload: ask others, or later
                        job.deferred[(addr, i)] = trio.current_time() + FRUGAL_RETRY
                        continue
                    bits = bytearray(job.availability.get(addr, b""))
                    if i >> 3 < len(bits):  # it does not have it after all
                        bits[i >> 3] &= ~(0x80 >> (i & 7)) & 0xFF
                        job.availability[addr] = bytes(bits)
                elif isinstance(ev, W.Goodbye):
                    return

    async def _take(self, job: _Fetch, piece: W.Piece, i: int, st: PeerStats) -> None:
        expected = job.ids[i]
        data = bytes(piece.data)
        if piece.chunk_id != expected or hash_chunk(data) != expected:
            st.corrupt += 1
            if st.corrupt >= MAX_BAD_CHUNKS:
                raise _PeerFailed(f"sent {st.corrupt} chunks that fail blake3: banned")
            return
        if i in job.done:
            return
        job.done.add(i)
        st.bytes += len(data)
        st.chunks += 1
        await job.deliver(expected, data)
        if job.wanted <= job.done and job.finished is not None:
            job.finished.cancel()  # every chunk is here: close all peer connections


class _PeerFailed(Exception):
    """Internal: drop this peer (the reason goes to its PeerStats)."""


#: What ends one peer's connection and nothing else.
_CONNECTION_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, OSError)
