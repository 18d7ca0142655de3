"""The fast announce listener: a minimal, strict HTTP/1.1 server for ``POST /v1/announce`` only.

Theory of operation
-------------------
Measured on the 2-core benchmark machine, hypercorn + Starlette cost about 0.4 ms of CPU per
request (a bare hypercorn-trio ASGI app answers ~2,400 requests/s, the tracker's ``/healthz``
~1,470/s), more than twice the whole announce itself (signature check, parsing, swarm update,
answer: ~0.15 ms). Announces are the one request every node sends every ``interval``, so the
tracker can serve them on a second port with a server that does nothing else: read a request,
hand its body to :meth:`tracker.app.Tracker.announce` (the same code, state, limits and
metrics as the main port), write the answer, keep the connection for the next one.

It is deliberately narrow and strict, like h11 (docs/style.md):

* :class:`RequestReader` is sans-IO: ``feed(bytes)`` then ``next_request()`` returns a
  :class:`Request`, ``None`` (need more bytes) or raises :class:`HTTPRefusal`. Request head at
  most ``MAX_HEAD_BYTES``, body at most ``core.MAX_ANNOUNCE_BYTES``, framed by
  ``Content-Length`` only (no chunked bodies, no ``Expect``, no obsolete line folding). Any
  violation answers 4xx and closes the connection.
* Only ``POST /v1/announce``; any other path is a 404 and any other method a 405 (with
  ``Allow``), and the connection is closed (that client is lost). Everything else stays on the
  main port.
* HTTP/1.1 keep-alive (``Connection: close`` and HTTP/1.0 close after the answer); requests are
  answered in order, one at a time per connection (pipelined ones wait in the buffer).
* At most ``max_connections`` open connections (beyond that a new connection is closed at once);
  a connection idle for ``idle_timeout`` seconds, or slow to send a request, is closed.
* The per-client rate limit of the main port applies (429 with ``Retry-After``).

The trio shell works on the connection's plain (non-blocking) socket with trio's I/O waits
(``trio.lowlevel.wait_readable``/``wait_writable``), not on ``trio.socket`` (whose ``recv`` first
tries the call, fails with ``EAGAIN`` because the client is waiting for our answer, then waits,
and whose ``send`` adds a trip through the scheduler after every successful call): per request
one wait for readability, one ``recv`` and one ``send``. The connection's idle deadline lives in
one cancel scope and moves forward only when it gained more than ``idle / 64`` (not on every
request). Every request still passes a checkpoint: the wait for the next request, or an
explicit one when the next is already buffered (a pipelining client cannot starve the others).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2pnode.discovery.tracker_api import SESSION_HEADER, SIGNATURE_HEADER

from . import core
from .errors import APIError, HTTPRefusal, RateLimited, Unavailable

if TYPE_CHECKING:
    from .app import Tracker

__all__ = [
    "MAX_HEAD_BYTES",
    "HTTPRefusal",
    "Request",
    "RequestReader",
    "serve_announces",
]

log = logging.getLogger(__name__)

#: Request line plus headers, at most (h11's default limit is 16 KiB; an announce needs ~200 B).
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = core.MAX_ANNOUNCE_BYTES
#: Open connections at most; each holds a buffer of at most MAX_HEAD_BYTES + MAX_BODY_BYTES.
MAX_CONNECTIONS = 4096
#: A connection with no complete request for this long is closed (hypercorn's default is 5 s
#: for keep-alive; nodes announce every ``interval``, so holding connections longer buys little).
IDLE_TIMEOUT = 75.0
ANNOUNCE_PATH = b"/v1/announce"
_SIG = SIGNATURE_HEADER.lower().encode()
_SESSION = SESSION_HEADER.lower().encode()


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    signature: str | None
    body: bytes
    keep_alive: bool
    session: str | None = None


class RequestReader:
    """Bytes in, :class:`Request` events out; no I/O (see the module docstring)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf)

    def next_request(self) -> Request | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise HTTPRefusal(
                    431, "too_large", "request head too large", f"keep it under {MAX_HEAD_BYTES}"
                )
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _bad("malformed request line")
        method, target, version = parts
        length: int | None = None
        signature: str | None = None
        session: str | None = None
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise _bad("malformed header line")
            name = name.lower()
            value = value.strip()
            if name == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 9:
                    raise _bad("Content-Length must appear once, as a number")
                length = int(value)
            elif name == _SIG:
                signature = value.decode("latin-1")
            elif name == _SESSION:
                session = value.decode("latin-1")
            elif name == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
            elif name == b"transfer-encoding" or name == b"expect":
                raise HTTPRefusal(
                    501,
                    "bad_request",
                    f"{name.decode()} is not supported here",
                    "send the body with Content-Length",
                )
        if length is None:
            length = 0
            if method == b"POST":
                raise HTTPRefusal(411, "bad_request", "Content-Length is required", "send it")
        if length > MAX_BODY_BYTES:
            raise HTTPRefusal(
                413,
                "too_large",
                f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit",
                "send a smaller request body",
            )
        total = end + 4 + length
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return Request(method, target, signature, body, keep_alive, session)


def _bad(message: str) -> HTTPRefusal:
    return HTTPRefusal(400, "bad_request", message, "send a well-formed HTTP/1.1 request")


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    411: b"Length Required",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
}


_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"


def response(
    status: int, body: bytes, *, close: bool = False, headers: dict[str, str] | None = None
) -> bytes:
    """One complete HTTP/1.1 response with a JSON body."""
    if status == 200 and not close and not headers:  # nearly every answer: one formatting
        return _OK % (len(body), body)
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
    )
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n".encode()
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def error_body(code: str, message: str, fix: str) -> bytes:
    return json.dumps({"error": code, "message": message, "fix": fix}).encode()


async def serve_announces(
    tracker: Tracker,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``POST /v1/announce`` on ``host:port`` until cancelled; reports the bound port.

    The bound port is also set as ``tracker.fast_port``, so the main port's announce answers
    advertise it (``announce_port``) and clients switch to it.
    """
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    listener = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(1024)
        bound = int(listener.getsockname()[1])
        tracker.set_fast_port(bound)
        active = [0]
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            while True:
                try:
                    conn, addr = await listener.accept()
                except OSError as exc:  # overload (EMFILE, ENOBUFS ...): back off, as trio does
                    log.warning("fast announce listener: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                # the connection is served on its plain socket (see the module docstring)
                sock = socket.socket(conn.family, conn.type, conn.proto, conn.detach())
                if active[0] >= max_connections:
                    sock.close()
                    continue
                active[0] += 1
                nursery.start_soon(_connection, tracker, sock, addr[0], idle_timeout, active)


async def _connection(
    tracker: Tracker, sock: socket.socket, client: str, idle: float, active: list[int]
) -> None:
    reader = RequestReader()
    wait_readable = trio.lowlevel.wait_readable
    slack = idle / 64
    try:
        with trio.CancelScope(deadline=trio.current_time() + idle) as scope:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    req = reader.next_request()
                except HTTPRefusal as exc:
                    await _send_all(
                        sock,
                        response(
                            exc.status,
                            error_body(exc.code, exc.message, exc.fix),
                            close=True,
                            headers=exc.headers,
                        ),
                    )
                    tracker.metrics.record_announce(exc.status, 0.0, exc.code)
                    return
                if req is None:
                    await wait_readable(sock)
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    reader.feed(data)
                    continue
                t0 = time.perf_counter()
                out, status, code, close = await _answer(tracker, req, client)
                await _send_all(sock, out)
                tracker.metrics.record_announce(status, time.perf_counter() - t0, code)
                if close:
                    return
                deadline = trio.current_time() + idle
                if deadline - scope.deadline > slack:
                    scope.deadline = deadline
                if reader.pending:  # the next request is already here: let others run first
                    await trio.lowlevel.checkpoint()
    except OSError:
        pass  # the client went away; nothing to answer
    finally:
        trio.lowlevel.notify_closing(sock)  # before close: trio forgets the fd's registration
        sock.close()
        active[0] -= 1


async def _answer(
    tracker: Tracker, req: Request, client: str
) -> tuple[bytes, int, str | None, bool]:
    """The response bytes, status, refusal code and whether to close, for one request."""
    close = not req.keep_alive
    if req.target.split(b"?", 1)[0] != ANNOUNCE_PATH:
        body = error_body(
            "not_found", "this port serves POST /v1/announce only", "use the tracker's main port"
        )
        return response(404, body, close=True), 404, "not_found", True
    if req.method != b"POST":
        body = error_body("bad_request", "only POST is allowed here", "POST the announce")
        out = response(405, body, close=True, headers={"allow": "POST"})
        return out, 405, "bad_request", True
    wait = tracker.client_wait(client)
    try:
        if wait > 0:
            raise RateLimited(f"more than {tracker.config.client_rate:g} requests/s from {client}")
        answer = await tracker.announce(req.body, req.signature, client, req.session)
    except (APIError, Unavailable) as exc:
        headers = {"retry-after": str(max(1, round(wait)))} if wait > 0 else None
        body = error_body(exc.code, exc.message, exc.fix)
        return response(exc.status, body, close=close, headers=headers), exc.status, exc.code, close
    except Exception:  # a bug: answer 500 and keep serving others (this task is the boundary)
        log.exception("fast announce listener: announce failed")
        body = error_body("internal", "the tracker failed", "retry later; report the bug")
        return response(500, body, close=True), 500, None, True
    return response(200, answer, close=close), 200, None, close


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data``; waits only when the socket's send buffer is full."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[n:]
