"""Connections between nodes: dialling and accepting over TLS, and one connection's writes.

Theory of operation
-------------------
Every connection is TLS 1.3 with both node ids proven by certificate (``identity``) and ALPN
``p2pnode/1``. :func:`dial` connects to a peer (retried with backoff, since the peers of a
swarm start together); :func:`accept` takes a connection a peer made to us. Either way the
result becomes a :class:`Link`: the connection's :class:`~p2pnode.swarm.peer.PeerSession`, the
swarms it is in, and a queue drained by one writer task, so that frames can be sent from
outside the connection's own loop (``have``, choke and unchoke). Pieces are written by the
task answering the request, in slices (``Link.write``), between the queue's frames.

What ends one connection and nothing else is :data:`CONNECTION_ENDED`; the serving and fetching
loops (``serving.py``, ``fetching.py``) catch exactly that.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..errors import ProtocolError, RemoteProtocolError, SlowPeerError, UsageError
from ..identity import check_alpn
from ..ratelimit import RateLimiter
from .peer import PeerSession

__all__ = [
    "CONNECTION_ENDED",
    "Link",
    "PeerFailed",
    "accept",
    "dial",
    "parse_peer",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: One write to a peer (a queued frame, or a slice of a piece) must finish within this: a peer
#: that stops reading is dropped then, instead of holding its connection and upload slot (a
#: slice is 128 KiB, so this only drops peers slower than ~4 KiB/s).
WRITE_TIMEOUT = 30.0
CONNECT_ATTEMPTS = 7  # over ~3.5 s of backoff (0.1 s doubling, at most 1 s apart)
CONNECT_BACKOFF = (0.1, 1.0)
#: Unsent bytes a serving socket may hold (TCP_NOTSENT_LOWAT): little enough that the order
#: in which pieces are written (sendorder.py) is the order they leave in, enough to keep a
#: gigabit link busy across a wake-up (2 ms). Bytes in flight are not limited by it.
NOTSENT_LOWAT = 256 * 1024
#: Frames queued per connection before haves are dropped and answers wait.
LINK_QUEUE = 32
#: Pieces are written in slices this big; rate caps are paid and a later piece gives way to
#: a first piece (sendorder.py) between slices.
WRITE_SLICE = 128 * 1024


def parse_peer(text: str, *, listen: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); a listen address may use port 0 (any free port)."""
    host, _, port = text.rpartition(":")
    low = 0 if listen else 1
    if not host or not port.isdigit() or not low <= int(port) < 65536:
        raise UsageError(f"{text!r} is not HOST:PORT", fix="write addresses as 10.0.0.5:6881")
    return host.strip("[]"), int(port)


class PeerFailed(Exception):
    """Internal: drop this peer (the reason goes to its PeerStats)."""


#: What ends one peer's connection and nothing else.
CONNECTION_ENDED = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ProtocolError,
    SlowPeerError,
    OSError,
)


async def dial(host: str, port: int, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """TLS to a peer, retried with backoff: peers of a swarm start at about the same time,
    and one that is not listening yet should not be written off."""
    delay, most = CONNECT_BACKOFF
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                tls = trio.SSLStream(stream, ctx, server_hostname="p2pnode-peer")
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


async def accept(
    stream: trio.SocketStream, ctx: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream] | None:
    """The TLS side of a connection a peer made to us, or None when it did not complete a
    handshake in time or speaks another protocol (the caller closes ``stream``)."""
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except (OSError, AttributeError):  # not Linux: the kernel keeps its own order
        pass
    with trio.move_on_after(CONNECT_TIMEOUT) as scope:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        await tls.do_handshake()
    if scope.cancelled_caught:
        return None
    try:
        check_alpn(tls)
    except RemoteProtocolError as exc:
        log.info("refused a connection: %s", exc.message)
        return None
    return tls


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

    async def write(
        self, frame: Sequence[bytes | memoryview], before_slice: Callable[[int], Awaitable[None]]
    ) -> None:
        """Write a piece's ``frame`` (``PeerSession.send_frame``) now, between the queue's
        frames: its leading parts (length and header, a few dozen bytes) as one slice, then
        its payload in slices of the caller's buffer (not copied), awaiting
        ``before_slice(size)`` before each: the shell's rate caps and write order
        (sendorder.py) then apply per slice, not per piece, so a piece that must give way
        to a first piece, or share a capped uplink, does so within a slice's time."""
        *lead, payload = frame
        head = b"".join(lead)
        view = memoryview(payload)
        async with self._sending:
            await before_slice(len(head))
            await self._send_all(head)
            for start in range(0, len(view), WRITE_SLICE):
                part = view[start : start + WRITE_SLICE]
                await before_slice(len(part))
                await self._send_all(part)

    def send_soon(self, data: bytes) -> None:
        try:
            self.out.send_nowait(data)
        except trio.WouldBlock:
            pass
