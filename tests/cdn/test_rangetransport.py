"""The range transport's HTTP/1.1 framing, against scripted servers on loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
import trio

from p2pnode.cdn.transport import RangeTransport

Handler = Callable[[trio.SocketStream, bytes], Awaitable[bool]]


async def read_request(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return b""
        buf += data
    return buf


async def serve(nursery: trio.Nursery, handler: Handler, connections: list[int]) -> str:
    """A server whose ``handler`` answers each request; it returns False to close."""

    async def conn(stream: trio.SocketStream) -> None:
        connections.append(1)
        async with stream:
            while True:
                req = await read_request(stream)
                if not req or not await handler(stream, req):
                    return

    listeners = await nursery.start(partial(trio.serve_tcp, conn, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


async def fetch(url: str, transport: RangeTransport) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport) as client:
        resp = await client.get(url + "f", headers={"Range": "bytes=0-9"})
        await resp.aread()
        return resp


async def test_keep_alive_reuses_one_connection() -> None:
    conns: list[int] = []

    async def h(s: trio.SocketStream, req: bytes) -> bool:
        assert req.startswith(b"GET /f HTTP/1.1\r\n") and b"\r\nrange: bytes=0-9" in req.lower()
        await s.send_all(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\n0123456789")
        return True

    async with trio.open_nursery() as n:
        url = await serve(n, h, conns)
        t = RangeTransport()
        async with httpx.AsyncClient(transport=t) as client:
            for _ in range(3):
                r = await client.get(url + "f", headers={"Range": "bytes=0-9"})
                assert r.status_code == 206 and r.content == b"0123456789"
        assert len(conns) == 1
        n.cancel_scope.cancel()


async def test_chunked_body_and_trailers() -> None:
    async def h(s: trio.SocketStream, req: bytes) -> bool:
        await s.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4;ext=1\r\nabcd\r\n6\r\nefghij\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        return True

    async with trio.open_nursery() as n:
        url = await serve(n, h, [])
        r = await fetch(url, RangeTransport())
        assert r.content == b"abcdefghij"
        n.cancel_scope.cancel()


async def test_body_until_close_and_truncated_body() -> None:
    async def until_close(s: trio.SocketStream, req: bytes) -> bool:
        await s.send_all(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        return False

    async def truncated(s: trio.SocketStream, req: bytes) -> bool:
        await s.send_all(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\n01234")
        return False

    async with trio.open_nursery() as n:
        url = await serve(n, until_close, [])
        assert (await fetch(url, RangeTransport())).content == b"all of it"
        url2 = await serve(n, truncated, [])
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await fetch(url2, RangeTransport())
        n.cancel_scope.cancel()


async def test_stale_keep_alive_is_retried_once_on_a_new_connection() -> None:
    conns: list[int] = []

    async def h(s: trio.SocketStream, req: bytes) -> bool:
        await s.send_all(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 2\r\n\r\nok")
        return False  # closes after answering, without saying Connection: close

    async with trio.open_nursery() as n:
        url = await serve(n, h, conns)
        t = RangeTransport()
        async with httpx.AsyncClient(transport=t) as client:
            for _ in range(2):
                r = await client.get(url + "f")
                assert r.content == b"ok"
        assert len(conns) == 2
        n.cancel_scope.cancel()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 2x6 Bad\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    ],
    ids=["status", "protocol", "folding", "length", "encoding", "header-count"],
)
async def test_malformed_heads_are_protocol_errors(head: bytes) -> None:
    async def h(s: trio.SocketStream, req: bytes) -> bool:
        await s.send_all(head)
        return False

    async with trio.open_nursery() as n:
        url = await serve(n, h, [])
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(url, RangeTransport())
        n.cancel_scope.cancel()


async def test_refused_connection_is_a_connect_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await fetch(f"http://127.0.0.1:{port}/", RangeTransport())
