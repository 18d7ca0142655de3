"""An httpx transport for bulk range downloads: HTTP/1.1 on trio with no extra copies.

Why not httpcore's default transport? It moves every body byte through h11's receive buffer:
appended to a bytearray, sliced out (twice) and turned back into bytes, four copies in Python
before the caller sees it. At disk speed on two cores those copies cost as much CPU as the
whole rest of an install (measured: 2.1-2.5 s of user CPU per GiB against aria2c's 0.5 s). This
transport hands the caller exactly the ``bytes`` objects the socket produced.

It speaks the subset of HTTP/1.1 a range fetcher needs, strictly: ``GET`` with headers and no
body; responses framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or connection
close; keep-alive connections pooled per origin; TLS through trio's ``SSLStream``. Timeouts are
the caller's trio cancel scopes (httpx's timeout settings are ignored). Failures surface as
the httpx exceptions the fetcher already handles: ``ConnectError``, ``ReadError``,
``WriteError`` and ``RemoteProtocolError`` (whose message for a body cut short says "complete
message body", as httpcore's does).

Everything else (the client API, URLs, headers, ``build_request``/``send``/``aiter_raw``) is
httpx's own, so the fetcher and its tests do not know which transport runs underneath.

One addition: a body framed by ``Content-Length`` (or by the connection's close) offers
``response.extensions[READINTO]``, an ``async readinto(buffer) -> int`` that receives straight
into the caller's buffer (``recv_into`` on plain TCP). The fetcher reads every chunk into a
buffer of the chunk's size that way, so a body byte is copied once, by the kernel.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx
import trio

__all__ = ["READINTO", "RangeTransport"]

#: The response extension holding a body's ``readinto`` (absent for chunked bodies).
READINTO = "p2pnode.readinto"

#: A response head larger than this is refused (nginx sends ~250 bytes; h11 uses 16 KiB).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
#: Largest single read. Big reads mean few trips through Python per megabyte.
READ_BYTES = 1 << 20
#: Reads while waiting for a response head: small, because whatever body bytes come along
#: with the head are copied through Python (a 1 MiB read here copied up to 3 MiB per request).
HEAD_READ_BYTES = 8 * 1024

_Origin = tuple[str, str, int]


@dataclass
class _Conn:
    stream: trio.abc.Stream
    buffer: bytes = b""  # bytes read past the previous response's end


@dataclass
class _Pool:
    idle: dict[_Origin, list[_Conn]] = field(default_factory=dict)


class RangeTransport(httpx.AsyncBaseTransport):
    """Args:
    max_connections: idle keep-alive connections kept per origin.
    socket_options: ``(level, option, value)`` set on each new socket (the fetcher caps
        ``SO_RCVBUF`` under a rate limit).
    ssl_context: for ``https`` origins; a default verifying context if None.
    """

    def __init__(
        self,
        *,
        max_connections: int = 8,
        socket_options: Sequence[tuple[int, int, int]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_idle = max_connections
        self._socket_options = list(socket_options)
        self._ssl_context = ssl_context
        self._pool = _Pool()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET":
            raise httpx.UnsupportedProtocol("RangeTransport only sends GET requests")
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}")
        port = url.port or (443 if url.scheme == "https" else 80)
        origin: _Origin = (url.scheme, url.host, port)
        head = _request_head(request)
        conn = self._idle_conn(origin)
        fresh = conn is None
        if conn is None:
            conn = await self._connect(origin, request)
        try:
            await conn.stream.send_all(head)
            status, reason, headers, conn.buffer = await _read_head(conn, request)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            await trio.aclose_forcefully(conn.stream)
            if fresh:
                raise
            # A kept-alive connection the server closed meanwhile: one retry on a new one.
            conn = await self._connect(origin, request)
            try:
                await conn.stream.send_all(head)
                status, reason, headers, conn.buffer = await _read_head(conn, request)
            except BaseException:
                await trio.aclose_forcefully(conn.stream)
                raise
        except BaseException:
            await trio.aclose_forcefully(conn.stream)
            raise
        try:
            body = _Body(self, origin, conn, request, headers)
        except BaseException:
            await trio.aclose_forcefully(conn.stream)
            raise
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1", "reason_phrase": reason}
        if not body.chunked:
            extensions[READINTO] = body.readinto
        return httpx.Response(
            status, headers=headers, stream=body, request=request, extensions=extensions
        )

    def _idle_conn(self, origin: _Origin) -> _Conn | None:
        idle = self._pool.idle.get(origin)
        return idle.pop() if idle else None

    async def _give_back(self, origin: _Origin, conn: _Conn) -> None:
        idle = self._pool.idle.setdefault(origin, [])
        if len(idle) < self._max_idle:
            idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)

    async def _connect(self, origin: _Origin, request: httpx.Request) -> _Conn:
        scheme, host, port = origin
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc}", request=request
            ) from exc
        sock = stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for level, option, value in self._socket_options:
            sock.setsockopt(level, option, value)
        if scheme == "https":
            ctx = self._ssl_context or ssl.create_default_context()
            tls = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                await trio.aclose_forcefully(stream)
                raise httpx.ConnectError(
                    f"TLS with {host}:{port} failed: {exc}", request=request
                ) from exc
            stream = tls
        return _Conn(stream)

    async def aclose(self) -> None:
        for conns in self._pool.idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)
        self._pool.idle.clear()


def _request_head(request: httpx.Request) -> bytes:
    url = request.url
    target = url.raw_path  # path and query, already percent-encoded
    lines = [b"GET " + target + b" HTTP/1.1"]
    has_host = False
    for name, value in request.headers.raw:
        if name.lower() == b"host":
            has_host = True
        if b"\r" in name + value or b"\n" in name + value:
            raise httpx.LocalProtocolError("header contains a line break", request=request)
        lines.append(name + b": " + value)
    if not has_host:
        lines.append(b"Host: " + url.netloc)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _receive(conn: _Conn, request: httpx.Request, size: int = READ_BYTES) -> bytes:
    try:
        data = await conn.stream.receive_some(size)
        return data if isinstance(data, bytes) else bytes(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(f"connection broke: {exc!r}", request=request) from exc


async def _receive_into(conn: _Conn, view: memoryview, request: httpx.Request) -> int:
    stream = conn.stream
    try:
        if isinstance(stream, trio.SocketStream):
            return await stream.socket.recv_into(view)
        data = await stream.receive_some(len(view))  # TLS: decrypted into new bytes anyway
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(f"connection broke: {exc!r}", request=request) from exc
    view[: len(data)] = data
    return len(data)


async def _read_head(
    conn: _Conn, request: httpx.Request
) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """Read and parse a response head; returns status, reason, headers and surplus bytes."""
    buf = bytearray(conn.buffer)
    conn.buffer = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError("response head too large", request=request)
        data = await _receive(conn, request, HEAD_READ_BYTES)
        if not data:
            raise httpx.RemoteProtocolError(
                "server closed the connection before sending a response", request=request
            )
        buf += data
    head = bytes(buf[:end])
    rest = bytes(buf[end + 4 :])
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}", request=request)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else b""
    if len(lines) - 1 > MAX_HEADERS:
        raise httpx.RemoteProtocolError("too many response headers", request=request)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in b" \t":
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}", request=request)
        headers.append((name, value.strip()))
    if 100 <= status < 200:
        raise httpx.RemoteProtocolError(f"unexpected informational {status}", request=request)
    return status, reason, headers, rest


class _Body(httpx.AsyncByteStream):
    """The response body as the socket's own ``bytes`` objects, framed per HTTP/1.1."""

    def __init__(
        self,
        transport: RangeTransport,
        origin: _Origin,
        conn: _Conn,
        request: httpx.Request,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._conn: _Conn | None = conn
        self._request = request
        values = {k.lower(): v for k, v in headers}
        self._keep_alive = values.get(b"connection", b"").lower() != b"close"
        te = values.get(b"transfer-encoding", b"").lower()
        length = values.get(b"content-length")
        self._chunked = self.chunked = te == b"chunked"
        if te and not self._chunked:
            raise httpx.RemoteProtocolError(f"unsupported transfer-encoding {te!r}")
        if self._chunked:
            self._remaining: int | None = None
        elif length is not None:
            if not length.isdigit():
                raise httpx.RemoteProtocolError(f"bad content-length {length!r}")
            self._remaining = int(length)
        else:
            self._remaining = None  # until the server closes
            self._keep_alive = False
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._conn is None:
            return
        if self._chunked:
            async for piece in self._chunked_pieces(self._conn):
                yield piece
        else:
            async for piece in self._plain_pieces(self._conn):
                yield piece
        self._complete = True
        await self.aclose()

    async def readinto(self, view: memoryview) -> int:
        """Receive up to ``len(view)`` body bytes into ``view``; 0 at the body's end.

        Raises ``RemoteProtocolError`` ("complete message body") if the connection closes
        before a ``Content-Length`` body is complete. Not for chunked bodies.
        """
        conn = self._conn
        if conn is None or self._chunked:
            raise RuntimeError("readinto needs an open body framed by length or close")
        want = len(view) if self._remaining is None else min(len(view), self._remaining)
        if want == 0:
            self._complete = self._remaining == 0
            return 0
        if conn.buffer:
            n = min(want, len(conn.buffer))
            view[:n] = conn.buffer[:n]
            conn.buffer = conn.buffer[n:]
        else:
            n = await _receive_into(conn, view[:want], self._request)
            if n == 0:
                if self._remaining is None:
                    self._complete = True
                    return 0
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"({self._remaining} bytes missing)",
                    request=self._request,
                )
        if self._remaining is not None:
            self._remaining -= n
            self._complete = self._remaining == 0
        return n

    async def _plain_pieces(self, conn: _Conn) -> AsyncIterator[bytes]:
        while self._remaining is None or self._remaining > 0:
            data = conn.buffer or await _receive(conn, self._request)
            conn.buffer = b""
            if not data:
                if self._remaining is None:
                    return
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"({self._remaining} bytes missing)",
                    request=self._request,
                )
            if self._remaining is not None:
                if len(data) > self._remaining:
                    conn.buffer = data[self._remaining :]
                    data = data[: self._remaining]
                self._remaining -= len(data)
            yield data

    async def _chunked_pieces(self, conn: _Conn) -> AsyncIterator[bytes]:
        while True:
            line = await self._line(conn)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while await self._line(conn):  # trailers, then the empty line
                    pass
                return
            left = size
            while left:
                data = conn.buffer or await _receive(conn, self._request)
                conn.buffer = b""
                if not data:
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body",
                        request=self._request,
                    )
                if len(data) > left:
                    conn.buffer = data[left:]
                    data = data[:left]
                left -= len(data)
                yield data
            if await self._line(conn):
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")

    async def _line(self, conn: _Conn) -> bytes:
        buf = conn.buffer
        while b"\r\n" not in buf:
            if len(buf) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("chunked framing line too long")
            data = await _receive(conn, self._request)
            if not data:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body",
                    request=self._request,
                )
            buf += data
        line, _, conn.buffer = buf.partition(b"\r\n")
        return line

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._keep_alive:
            await self._transport._give_back(self._origin, conn)
        else:
            await trio.aclose_forcefully(conn.stream)
