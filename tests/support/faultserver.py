"""A small HTTP/1.1 file server on trio that misbehaves on request, for what nginx will not do.

Start it inside the test's nursery::

    server = FaultServer(root)
    await nursery.start(server.serve)          # listening on server.url when this returns
    server.faults.append(Fault("status", status=503, times=2))

Every request is answered from ``root`` (keep-alive, single byte ranges, ETag from size and
mtime like nginx's, plus ``etag_salt``) unless a fault applies: requests take the first fault in
``faults`` whose ``times`` is not used up (``None`` = forever) and whose ``path`` matches (if
set). ``on_request`` runs before each response, so a test can change files on disk between
requests. ``log`` records what was asked and what was sent.

Fault kinds:
    ``status``        answer ``status`` with a short body (5xx, 404, 416, ...)
    ``ignore_range``  answer 200 with the whole file
    ``truncate``      promise the full range, send ``after`` bytes, close cleanly
    ``reset``         send ``after`` bytes, then reset the connection (RST)
    ``short_range``   a valid 206 for only the first half of the asked range
    ``wrong_size``    a Content-Range whose total is the real size + ``delta``
    ``drip``          send ``drip_bytes`` every ``drip_interval`` seconds
    ``stall``         send the headers and ``after`` bytes, then nothing (connection open)
    ``corrupt``       flip every byte at an offset that is a multiple of ``stride``
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import trio


@dataclass
class Fault:
    kind: str
    times: int | None = None
    path: str | None = None  # only requests whose URL path ends with this
    status: int = 503
    after: int = 0
    delta: int = 1
    drip_bytes: int = 1
    drip_interval: float = 0.05
    stride: int = 4096


@dataclass
class Logged:
    path: str
    range: str | None
    status: int
    fault: str | None
    body_bytes: int = 0


@dataclass
class FaultServer:
    root: Path
    faults: list[Fault] = field(default_factory=list)
    on_request: Callable[[int, str], None] | None = None
    etag_salt: str = ""
    log: list[Logged] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def body_bytes_sent(self) -> int:
        return sum(e.body_bytes for e in self.log)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def _pick(self, path: str) -> Fault | None:
        for f in self.faults:
            if f.path is not None and not path.endswith(f.path):
                continue
            if f.times is None:
                return f
            if f.times > 0:
                f.times -= 1
                return f
        return None

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                keep = await self._respond(stream, unquote(target), headers.get("range"))
                if not keep:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _respond(self, stream: trio.SocketStream, path: str, rng: str | None) -> bool:
        """Answer one request; False when the connection must close."""
        if self.on_request is not None:
            self.on_request(len(self.log), path)
        fault = self._pick(path)
        entry = Logged(path, rng, 0, fault.kind if fault else None)
        self.log.append(entry)
        file = self.root / path.lstrip("/")
        if fault is not None and fault.kind == "status":
            entry.status = fault.status
            body = f"fault {fault.status}\n".encode()
            await self._send_head(stream, fault.status, len(body), {})
            await stream.send_all(body)
            return True
        try:
            data = file.read_bytes()
            st = file.stat()
        except OSError:
            entry.status = 404
            await self._send_head(stream, 404, 0, {})
            return True
        size = len(data)
        etag = f'"{int(st.st_mtime):x}-{size:x}{self.etag_salt}"'
        start, end = 0, size
        status = 200
        extra = {"ETag": etag}
        if rng and (fault is None or fault.kind != "ignore_range"):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(size, int(last) + 1) if last else size
            if start >= size:
                entry.status = 416
                await self._send_head(stream, 416, 0, {"Content-Range": f"bytes */{size}"})
                return True
            if fault is not None and fault.kind == "short_range":
                end = start + max(1, (end - start) // 2)
            total = size + (fault.delta if fault and fault.kind == "wrong_size" else 0)
            status = 206
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        entry.status = status
        body = data[start:end]
        if fault is not None and fault.kind == "corrupt":
            b = bytearray(body)
            for i in range((-start) % fault.stride, len(b), fault.stride):
                b[i] ^= 0xFF
            body = bytes(b)
        await self._send_head(stream, status, len(body), extra)
        kind = fault.kind if fault else None
        if kind in ("truncate", "reset", "stall"):
            assert fault is not None
            part = body[: fault.after]
            await stream.send_all(part)
            entry.body_bytes = len(part)
            if kind == "reset":
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            if kind == "stall":
                await trio.sleep_forever()
            return False
        if kind == "drip":
            assert fault is not None
            for i in range(0, len(body), fault.drip_bytes):
                await stream.send_all(body[i : i + fault.drip_bytes])
                entry.body_bytes += len(body[i : i + fault.drip_bytes])
                await trio.sleep(fault.drip_interval)
            return True
        view = memoryview(body)
        for i in range(0, len(body), 256 * 1024):
            await stream.send_all(view[i : i + 256 * 1024])
            entry.body_bytes += len(view[i : i + 256 * 1024])
        return True

    @staticmethod
    async def _send_head(
        stream: trio.SocketStream, status: int, length: int, extra: dict[str, str]
    ) -> None:
        reason = {200: "OK", 206: "Partial Content", 404: "Not Found", 416: "Range Not Satisfiable"}
        lines = [f"HTTP/1.1 {status} {reason.get(status, 'Fault')}", f"Content-Length: {length}"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
