"""The swarm's trio shell: serve chunks to peers, and fetch chunks from them.

Theory of operation
-------------------
Each connection is TLS 1.3 with both node ids proven (``identity``), then a
:class:`~p2pnode.swarm.peer.PeerSession` checks the protocol. The decisions live in sans-IO
classes: :class:`~p2pnode.swarm.scheduler.Scheduler` (what to request of whom) and
:class:`~p2pnode.swarm.choker.Choker` (whom to serve). This module moves bytes between them and
the sockets:

* **Serving** (``serve``): every manifest this node ``offer``s is answered with its availability
  bitfield (from :class:`~p2pnode.disk.stage.LocalChunks`, so an unfinished install and the kept
  earlier builds of an app serve too); peers the choker unchokes are served from verified local
  reads, others are rejected with ``choked``. Upload is capped globally and per peer.
* **Fetching** (``fetch``): one task per peer, each keeping the scheduler's pipeline for that
  peer full; every piece is checked with blake3 before ``deliver``; a peer that sends a bad chunk
  twice is banned by node id (``banned``: not fetched from nor served again, on any address);
  one that stalls or breaks the protocol is dropped; their requests go to others; endgame
  duplicates that lose the race are cancelled. ``fetch`` returns the chunks no peer could give,
  for the CDN.

Every network wait is bounded by a cancel scope.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ..disk.stage import LocalChunks
from ..errors import (
    ManifestError,
    P2PNodeError,
    ProtocolError,
    RemoteProtocolError,
    SlowPeerError,
    UsageError,
)
from ..identity import NodeIdentity, check_alpn, client_context, peer_node_id, server_context
from ..ratelimit import RateLimiter
from ..release import manifest as M
from ..release.chunker import hash_chunk
from . import wire as W
from .choker import DEFAULT_SLOTS, Choker
from .peer import PeerSession
from .recent import RecentSet
from .scheduler import CDN, LEECHER_WAIT, Scheduler
from .sendorder import SendOrder

__all__ = ["CdnSource", "Link", "PeerStats", "SwarmNode", "parse_peer"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: One write to a peer (a queued frame, or a slice of a piece) must finish within this: a peer
#: that stops reading is dropped then, instead of holding its connection and upload slot (a
#: slice is 128 KiB, so this only drops peers slower than ~4 KiB/s).
WRITE_TIMEOUT = 30.0
CONNECT_ATTEMPTS = 7  # over ~3.5 s of backoff (0.1 s doubling, at most 1 s apart)
CONNECT_BACKOFF = (0.1, 1.0)
#: A request unanswered this long (a stalled or slow-dripping peer) drops the peer.
REQUEST_TIMEOUT = 10.0
#: No chunk from any peer for this long: give the rest to the CDN (p2p-first's deadline).
STALL_TIMEOUT = 15.0
WATCH_INTERVAL = 0.25
MAX_BAD_CHUNKS = 2
#: Node ids banned for corrupt chunks, remembered at most (the oldest ban is forgotten).
MAX_BANNED = 4096
#: Chunk reads in progress at once (disk concurrency, independent of the choker's slots).
READ_SLOTS = 16
#: Manifests peers showed us that we serve as partial seeds, at most (oldest forgotten).
MAX_PUSHED = 8
#: Peers served at once; more are refused at accept (a flood of connections costs nothing).
MAX_CONNECTIONS = 64
#: Unsent bytes a serving socket may hold (TCP_NOTSENT_LOWAT): little enough that the order
#: in which pieces are written (sendorder.py) is the order they leave in, enough to keep a
#: gigabit link busy across a wake-up (2 ms). Bytes in flight are not limited by it.
NOTSENT_LOWAT = 256 * 1024

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

    def shown_by(self, peer: str) -> None:
        """The peer showed its bitfield, or its task ended: it is no longer connecting."""
        if peer not in self.shown:
            self.shown.add(peer)
            self.connecting -= 1


class Link:
    """One live connection: its session, the swarms it is in, and a writer task's queue.

    Everything sent goes through the queue, so ``have`` messages can be pushed from outside the
    connection's own loop; haves are dropped when a slow peer's queue is full (it will ask).
    Every write is bounded by ``write_timeout`` (``SlowPeerError``), so a peer that stops
    reading cannot hold the connection, nor the task serving it, for longer.
    """

    def __init__(
        self,
        tls: trio.SSLStream[trio.SocketStream],
        session: PeerSession,
        node_id: bytes,
        cap: RateLimiter,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.tls = tls
        self.write_timeout = write_timeout
        self.session = session
        self.node_id = node_id
        #: This peer's rate cap (upload when serving it, download when fetching from it);
        #: the global caps apply too.
        self.cap = cap
        self.manifests: set[bytes] = set()
        #: Where the peer itself listens (an inbound link: its address and its hello's port).
        self.host: str | None = None
        self.listen_port = 0
        self.out, self._out = trio.open_memory_channel[bytes](LINK_QUEUE)
        # Choke and unchoke never wait behind a full queue, nor get dropped like haves.
        self.control, self._control = trio.open_memory_channel[bytes](8)
        self._sending = trio.Lock()

    async def writer(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain, self._control)
            await self._drain(self._out)
            nursery.cancel_scope.cancel()

    async def _drain(self, channel: trio.MemoryReceiveChannel[bytes]) -> None:
        async for data in channel:
            async with self._sending:
                await self._send_all(data)

    async def _send_all(self, data: bytes | memoryview) -> None:
        """Write to the peer, bounded: it must take the bytes within ``write_timeout``."""
        with trio.move_on_after(self.write_timeout) as scope:
            await self.tls.send_all(data)
        if scope.cancelled_caught:
            raise SlowPeerError(
                f"the peer did not take {len(data)} bytes within {self.write_timeout:g}s"
            )

    async def send(self, data: bytes) -> None:
        if data:
            await self.out.send(data)

    async def write(self, data: bytes, before_slice: Callable[[int], Awaitable[None]]) -> None:
        """Write a piece now, between the queue's frames, in slices, awaiting
        ``before_slice(size)`` before each: the shell's rate caps and write order
        (sendorder.py) then apply per slice, not per piece, so a piece that must give way
        to a first piece, or share a capped uplink, does so within a slice's time."""
        view = memoryview(data)
        async with self._sending:
            for start in range(0, len(view), WRITE_SLICE):
                part = view[start : start + WRITE_SLICE]
                await before_slice(len(part))
                await self._send_all(part)

    def send_soon(self, data: bytes) -> None:
        try:
            self.out.send_nowait(data)
        except trio.WouldBlock:
            pass


#: Frames queued per connection before haves are dropped and answers wait.
LINK_QUEUE = 32
#: Pieces are written in slices this big; rate caps are paid and a later piece gives way to
#: a first piece (sendorder.py) between slices.
WRITE_SLICE = 128 * 1024


class SwarmNode:
    """Args (beyond identity and local chunks):
    upload_limiter, download_limiter: global caps, shared with other transfers (the CDN's).
    peer_upload_rate, peer_download_rate: caps per peer connection, bytes/s (None: none).
    upload_slots: peers served at once (the choker's slots).
    frugal: origin-frugal seeding (see ``_frugal_refuses``).
    spare: with ``frugal``, say ``origin`` in the hello so leechers spare this node's upload
        (they ask it only for rare chunks: less upload, a slower finish; see scheduler.py).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        local: LocalChunks,
        listen_port: int = 0,
        *,
        idle_timeout: float = 120.0,
        hello_timeout: float = CONNECT_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        leecher_wait: float = LEECHER_WAIT,
        max_connections: int = MAX_CONNECTIONS,
        upload_limiter: RateLimiter | None = None,
        download_limiter: RateLimiter | None = None,
        peer_upload_rate: int | None = None,
        peer_download_rate: int | None = None,
        upload_slots: int = DEFAULT_SLOTS,
        frugal: bool = False,
        spare: bool = True,
    ) -> None:
        self.identity = identity
        self.local = local
        self.listen_port = listen_port
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.write_timeout = write_timeout
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.leecher_wait = leecher_wait
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0
        self.frugal = frugal
        self._sent: dict[bytes, list[int]] = {}  # manifest id -> uploads per chunk index
        self._unsent: dict[bytes, int] = {}  # manifest id -> chunks never uploaded
        self.upload_limiter = upload_limiter or RateLimiter(None)
        self.download_limiter = download_limiter or RateLimiter(None)
        self.peer_upload_rate = peer_upload_rate
        self.peer_download_rate = peer_download_rate
        self.choker = Choker(upload_slots)
        self.send_order = SendOrder()
        self._granted: set[int] = set()  # send_order tickets granted, not yet started
        self._order_changed = trio.Event()  # set (and replaced) when the write order changes
        self.offers: dict[bytes, list[bytes]] = {}  # manifest id -> unique chunk ids
        self.index: dict[bytes, dict[bytes, int]] = {}  # manifest id -> chunk id -> index
        self.manifests: dict[bytes, M.Manifest] = {}
        self.links: set[Link] = set()
        #: Node ids that sent MAX_BAD_CHUNKS corrupt chunks, oldest first: never fetched from
        #: nor served again, whatever address or port they come from (bounded: MAX_BANNED).
        self.banned: RecentSet[bytes] = RecentSet(MAX_BANNED)
        self.signed: dict[bytes, bytes] = {}  # manifest id -> signed manifest, to push
        self._pushed: dict[bytes, None] = {}  # manifests peers pushed to us, oldest first
        self._verifying = trio.Semaphore(1)  # one pushed manifest parsed at a time
        self.uploaded = 0
        self._reads = trio.Semaphore(READ_SLOTS)
        # manifest id -> how to add a peer to our running fetch of it (dial-back, see _serve_loop)
        self._fetching: dict[bytes, Callable[[str, int], None]] = {}
        # A frugal seed is a seed box (an origin): it says so, and leechers spare its upload.
        self._caps = (b"origin",) if frugal and spare else ()
        self._server_ctx = server_context(identity)
        self._client_ctx = client_context(identity)

    def offer(self, manifest: M.Manifest, signed: bytes | None = None) -> None:
        """Serve ``manifest``'s swarm; with ``signed`` (its signed encoding), peers that do
        not know it yet can be shown it and serve the chunks they share with it."""
        if signed is not None:
            self.signed[manifest.id] = signed
        self.manifests[manifest.id] = manifest
        self.offers[manifest.id] = list(manifest.unique_chunks())
        self.index[manifest.id] = {cid: i for i, cid in enumerate(self.offers[manifest.id])}

    def ban(self, node_id: bytes) -> None:
        self.banned.add(node_id)

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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rechoke)
            task_status.started(bound)
            await trio.serve_listeners(self._serve_one, listeners)

    async def _rechoke(self) -> None:
        """Apply the choker's periodic decisions (regular slots, optimistic unchoke)."""
        while True:
            await trio.sleep_until(max(self.choker.next_tick(), trio.current_time() + 0.1))
            self._apply(self.choker.tick(trio.current_time()))

    def _apply(self, decisions: list[tuple[bytes, bool]]) -> None:
        now = trio.current_time()
        for node_id, unchoke in decisions:
            for link in list(self.links):
                s = link.session
                if link.node_id != node_id or s.state.value != "open" or link.manifests == set():
                    continue
                if s.am_choking == unchoke:  # a change for this link
                    msg: W.Event = W.Unchoke() if unchoke else W.Choke()
                    try:
                        link.control.send_nowait(s.send(msg, now))
                    except (trio.WouldBlock, trio.ClosedResourceError):
                        pass

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        link: Link | None = None
        try:
            try:
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            except (OSError, AttributeError):  # not Linux: the kernel keeps its own order
                pass
            with trio.move_on_after(CONNECT_TIMEOUT) as scope:
                tls = trio.SSLStream(stream, self._server_ctx, server_side=True)
                await tls.do_handshake()
            if scope.cancelled_caught:
                return
            try:
                check_alpn(tls)
            except RemoteProtocolError as exc:
                log.info("refused a connection: %s", exc.message)
                return
            node_id = peer_node_id(tls)
            if node_id in self.banned:
                log.debug("refused a banned peer")
                return
            session = PeerSession(
                self.identity.node_id,
                self.listen_port,
                now=trio.current_time(),
                expected_id=node_id,
                idle_timeout=self.idle_timeout,
                hello_timeout=self.hello_timeout,
            )
            link = Link(
                tls, session, node_id, RateLimiter(self.peer_upload_rate), self.write_timeout
            )
            try:
                link.host = str(stream.socket.getpeername()[0])
            except OSError:
                pass
            await link.send(session.hello(trio.current_time(), self._caps))  # (writer: first)
            self.links.add(link)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.writer)
                await self._serve_loop(link)
                nursery.cancel_scope.cancel()
        except* _CONNECTION_ENDED as group:  # (a writer task's failure arrives grouped)
            log.debug("peer connection ended: %r", group.exceptions[0])
        finally:
            self.connections -= 1
            if link is not None:
                self.links.discard(link)
                if not any(other.node_id == link.node_id for other in self.links):
                    self._apply(self.choker.gone(link.node_id, trio.current_time()))
            await trio.aclose_forcefully(stream)

    async def _serve_loop(self, link: Link) -> None:
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
                    link.listen_port = ev.listen_port
                elif isinstance(ev, W.Join):
                    self._dial_back(link, ev.manifest)
                    out += s.send(self._bitfield(ev.manifest), now)
                    if ev.manifest in self.offers:
                        # Only swarms we serve are kept: a joined id is otherwise answered
                        # (n = 0) and forgotten, so a peer cannot grow what ``have`` walks.
                        link.manifests.add(ev.manifest)
                        await link.send(out)
                        out = b""
                        self._apply(self.choker.interested(link.node_id, now))
                elif isinstance(ev, W.ManifestPush):
                    await link.send(out)
                    out = b""
                    if await self._accept_push(ev):
                        link.manifests.add(ev.manifest)
                        self._apply(self.choker.interested(link.node_id, now))
                    out += s.send(self._bitfield(ev.manifest), trio.current_time())
                elif isinstance(ev, W.Request):
                    await link.send(out)
                    out = await self._answer(link, ev)
                elif isinstance(ev, W.Goodbye):
                    return
            await link.send(out)

    def _dial_back(self, link: Link, manifest: bytes) -> None:
        """A peer that fetches what we are fetching too serves it as well: connect back to
        where it listens, so one side knowing the other is enough for both to trade (and a
        peer we gave up on while it was starting is tried again)."""
        add = self._fetching.get(manifest)
        if add is not None and link.host is not None and link.listen_port:
            add(link.host, link.listen_port)

    async def _accept_push(self, push: W.ManifestPush) -> bool:
        """Take part in the swarm of a manifest a peer showed us, when it is signed by the
        publisher key of an app we already serve: our chunks of the app's earlier builds then
        serve its newer build (a cross-version partial seed). Anything else is refused."""
        if push.manifest in self.manifests:
            return True
        async with self._verifying:
            try:
                manifest = await trio.to_thread.run_sync(self._verify_push, push)
            except P2PNodeError as exc:
                log.info("refused a pushed manifest: %s", exc)
                return False
        self.offer(manifest)
        self._pushed[manifest.id] = None
        while len(self._pushed) > MAX_PUSHED:  # forget the oldest (its peers get rejects)
            old = next(iter(self._pushed))
            del self._pushed[old]
            for table in (self.manifests, self.offers, self.index, self.signed):
                table.pop(old, None)
        return True

    def _verify_push(self, push: W.ManifestPush) -> M.Manifest:
        signed = M.parse_signed(bytes(push.signed), source="a manifest pushed by a peer")
        if signed.id != push.manifest:
            raise ManifestError("a pushed manifest is not the one its message names")
        app = signed.manifest.app
        trusted = {m.key for m in list(self.manifests.values()) if m.app == app}
        return M.verify(signed, trusted)

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

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        s = link.session
        now = trio.current_time()
        ids = self.offers.get(req.manifest)
        if ids is None or req.index >= len(ids):
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"unavailable"), now)
        self._apply(self.choker.interested(link.node_id, now))  # asking keeps the interest
        if s.am_choking:
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"choked"), now)
        if self._frugal_refuses(req.manifest, req.index):
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"frugal"), now)
        async with self._reads:
            data = await trio.to_thread.run_sync(self.local.read, ids[req.index])
        now = trio.current_time()
        if data is None:
            return s.send(W.Reject(req.manifest, req.index, req.rid, b"unavailable"), now)
        async with self._turn((link.node_id, req.manifest), len(data)) as first:

            async def before_slice(size: int) -> None:
                if not first:
                    await self._first_pieces_pass()
                await link.cap.acquire(size)
                await self.upload_limiter.acquire(size)

            now = trio.current_time()
            self.uploaded += len(data)
            self.choker.uploaded(link.node_id, len(data), now)
            self._count_sent(req.manifest, req.index)
            piece = W.Piece(req.manifest, req.index, req.rid, ids[req.index], data)
            await link.write(s.send(piece, now), before_slice)
        return b""

    @asynccontextmanager
    async def _turn(self, peer: tuple[bytes, bytes], size: int) -> AsyncIterator[bool]:
        """Wait until this piece may be written (sendorder.py: first pieces first); yields
        whether it is a first piece holding the turn, which ends with the block, or earlier
        by the order's turn limit."""
        order = self.send_order
        ticket = order.want(peer, trio.current_time(), size)
        try:
            await self._order_allows(lambda: ticket in self._granted)
            yield order.holds_turn(ticket)
        finally:
            self._granted.discard(ticket)
            order.done(ticket, trio.current_time())
            self._order_update(changed=True)  # (a turn may have ended)

    async def _first_pieces_pass(self) -> None:
        """Wait while a first piece holds the uplink (a later piece's pause between slices)."""
        await self._order_allows(lambda: not self.send_order.turn_held)

    async def _order_allows(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``, looking again whenever the write order changes or may
        (a turn's limit, a piece's wait; ``SendOrder.next_change``)."""
        while True:
            self._order_update()
            if ready():
                return
            with trio.move_on_at(self.send_order.next_change()):
                await self._order_changed.wait()

    def _order_update(self, *, changed: bool = False) -> None:
        """Take the order's grants; if there were any, or ``changed``, wake every waiter to
        look again (only then: waiters that woke each other for nothing would spin)."""
        granted = self.send_order.grants(trio.current_time())
        if granted or changed:
            self._granted.update(granted)
            self._order_changed.set()
            self._order_changed = trio.Event()

    # -- fetching ---------------------------------------------------------------------------

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
        unique = manifest.unique_chunks()
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
        install's policy."""
        sched = job.sched
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = trio.current_time()
            if (
                sched.finished
                or sched.peers_exhausted(now, job.connecting)
                or now - sched.last_progress > self.stall_timeout
            ):
                break
        assert job.finished is not None
        job.finished.cancel()

    async def _feed_cdn(self, job: _Fetch, cdn: CdnSource) -> None:
        """Hand the CDN what the scheduler gives it, a batch at a time, until the CDN fails
        (then it is no longer a source; the install's bulk CDN pass after the swarm phase
        reports why, if chunks are left)."""
        sched = job.sched
        async with trio.open_nursery() as batches:
            while cdn.error is None:
                sched.take_cancels(CDN)  # a peer was first: the CDN's copy will be a duplicate
                room = cdn.depth - sched.inflight(CDN)
                batch = sched.cdn_requests(trio.current_time(), room)
                if batch:
                    batches.start_soon(self._cdn_batch, job, cdn, batch)
                await trio.sleep(WATCH_INTERVAL)

    async def _cdn_batch(self, job: _Fetch, cdn: CdnSource, batch: list[int]) -> None:
        sched = job.sched

        async def take(cid: bytes, data: bytes) -> None:
            i = job.index.get(cid)
            if i is None or not sched.received(CDN, i, len(data), trio.current_time()):
                return  # a peer's copy landed first
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

    async def _connect(self, host: str, port: int) -> trio.SSLStream[trio.SocketStream]:
        """TLS to a peer, retried with backoff: peers of a swarm start at about the same time,
        and one that is not listening yet should not be written off."""
        delay, most = CONNECT_BACKOFF
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
                    tls = trio.SSLStream(stream, self._client_ctx, server_hostname="p2pnode-peer")
                    await tls.do_handshake()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(2 * delay, most)
                continue
            try:
                check_alpn(tls)  # not retried: the peer answered, in another protocol
            except RemoteProtocolError:
                await trio.aclose_forcefully(tls)
                raise
            return tls
        raise AssertionError("unreachable")

    async def _fetch_from(self, job: _Fetch, host: str, port: int, st: PeerStats) -> None:
        addr = f"{host}:{port}"
        t0 = st.opened = trio.current_time()
        try:
            tls = await self._connect(host, port)
            st.connect_s = trio.current_time() - t0
            st.node_id = peer_node_id(tls)
            if st.node_id in self.banned:
                st.error = "banned: it sent chunks that fail blake3 before"
            if st.node_id == self.identity.node_id or st.node_id in self.banned:
                await trio.aclose_forcefully(tls)
                return  # ourselves, or a node known to serve corrupt chunks
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
            await link.send(s.hello(now) + s.send(W.Join(job.manifest.id), now))
            link.manifests.add(job.manifest.id)
            self.links.add(link)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.writer)
                    await self._fetch_loop(job, link, addr, st)
                    nursery.cancel_scope.cancel()
            finally:
                self.links.discard(link)
                # Close now, not when collected: the peer's upload slot goes to someone else.
                await trio.aclose_forcefully(tls)
        except* (*_CONNECTION_ENDED, trio.TooSlowError, _PeerFailed) as group:
            exc = group.exceptions[0]
            st.failures += 1
            st.error = str(exc) or type(exc).__name__
        finally:
            job.shown_by(addr)
            job.active.discard(addr)
            job.sched.remove_peer(addr)  # what it did not deliver goes back to the pool
            st.seconds += trio.current_time() - t0

    async def _fetch_loop(self, job: _Fetch, link: Link, addr: str, st: PeerStats) -> None:
        tls, s, sched, mid = link.tls, link.session, job.sched, job.manifest.id
        inflight: dict[int, int] = {}  # rid -> index
        rid_of: dict[int, int] = {}  # index -> rid
        asked_at: dict[int, float] = {}  # rid -> when requested
        pushed = False
        last_piece = trio.current_time()  # a busy peer answers late but keeps answering
        while True:
            now = trio.current_time()
            out = b""
            for i in sched.take_cancels(addr):  # another peer answered first (endgame)
                if (rid := rid_of.pop(i, None)) is not None:
                    del inflight[rid], asked_at[rid]
                    out += s.send(W.Cancel(mid, i, rid), now)
            if addr in sched.peers and not s.peer_choking:
                for i in sched.next_requests(addr, now):
                    rid, data = s.request(mid, i, now)
                    inflight[rid], rid_of[i], asked_at[rid] = i, rid, now
                    out += data
            await link.send(out)
            deadline = min(s.get_timer(), now + self.request_timeout)
            if len(inflight) < sched.depth(addr, now):
                # Room in the pipeline: look again soon, as requests are given back, deferrals
                # end and others' requests turn late, without anything arriving here.
                deadline = min(deadline, now + WATCH_INTERVAL)
            with trio.move_on_at(deadline):
                received = await tls.receive_some(1 << 20)
                s.receive_data(received, trio.current_time())
                if not received:
                    raise _PeerFailed("the peer closed the connection")
                await link.cap.acquire(len(received))
                await self.download_limiter.acquire(len(received))
            now = trio.current_time()
            if s.overdue(now, self.request_timeout) and now - last_piece > self.request_timeout:
                raise _PeerFailed(f"no answer within {self.request_timeout:g}s")
            await link.send(s.handle_timer(trio.current_time()))
            while (ev := s.next_event()) is not None:
                now = trio.current_time()
                if isinstance(ev, W.Bitfield) and ev.manifest == mid:
                    if ev.count not in (0, len(job.ids)):
                        raise _PeerFailed("bitfield size does not match the manifest")
                    if ev.count == 0:  # the peer does not know this manifest
                        signed = self.signed.get(mid)
                        if signed is not None and s.peer_can(b"manifest") and not pushed:
                            pushed = True  # show it: it may hold an earlier build's chunks
                            await link.send(s.send(W.ManifestPush(mid, signed), now))
                            continue
                        job.shown_by(addr)
                        return  # the peer is not in this swarm
                    job.shown_by(addr)
                    sched.bitfield(addr, bytes(ev.bits), earlier_build=pushed)
                elif isinstance(ev, W.Hello) and s.peer_can(b"origin"):
                    sched.origins.add(addr)
                elif isinstance(ev, W.Have) and ev.manifest == mid:
                    sched.have(addr, ev.index)
                elif isinstance(ev, W.Piece):
                    last_piece = now
                    i = inflight.pop(ev.rid)
                    rid_of.pop(i, None)
                    st.response_s += now - asked_at.pop(ev.rid)
                    st.responses += 1
                    if st.first_piece_s is None:
                        st.first_piece_s = now - st.opened
                    await self._take(job, ev, i, addr, st)
                elif isinstance(ev, W.Reject):
                    i = inflight.pop(ev.rid)
                    rid_of.pop(i, None)
                    asked_at.pop(ev.rid, None)
                    sched.rejected(addr, i, bytes(ev.reason), now)
                elif isinstance(ev, (W.Join, W.ManifestPush, W.Request)):
                    # This node serves only on connections it accepted (the peer gets our
                    # chunks by dialling us, or by our dial-back).
                    with trio.fail_after(self.request_timeout):  # a peer that does not read
                        await link.send(s.decline(ev, now))
                elif isinstance(ev, W.Goodbye):
                    return

    async def _take(self, job: _Fetch, piece: W.Piece, i: int, addr: str, st: PeerStats) -> None:
        expected = job.ids[i]
        data = bytes(piece.data)
        if piece.chunk_id != expected or hash_chunk(data) != expected:
            st.corrupt += 1
            job.sched.failed(addr, i)
            if st.corrupt >= MAX_BAD_CHUNKS:
                self.ban(st.node_id)  # by node id: its other addresses and later fetches too
                raise _PeerFailed(f"sent {st.corrupt} chunks that fail blake3: banned")
            return
        now = trio.current_time()
        self.choker.downloaded(st.node_id, len(data), now)
        if not job.sched.received(addr, i, len(data), now):
            return  # a duplicate (endgame): another peer's copy was first
        st.bytes += len(data)
        st.chunks += 1
        await job.deliver(expected, data)
        if job.sched.finished and job.finished is not None:
            job.finished.cancel()  # every chunk is here: close all peer connections


class _PeerFailed(Exception):
    """Internal: drop this peer (the reason goes to its PeerStats)."""


#: What ends one peer's connection and nothing else.
_CONNECTION_ENDED = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ProtocolError,
    SlowPeerError,
    OSError,
)
