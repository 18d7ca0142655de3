"""The fast announce listener: the sans-IO request reader, and the server next to the main port."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable

import pytest
import trio

from p2pnode.discovery.tracker import ANNOUNCE_DOMAIN, TrackerClient, TrackerRefusedError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP
from tracker import Tracker, serve_tracker
from tracker.errors import HTTPRefusal
from tracker.fastpath import MAX_HEAD_BYTES, Request, RequestReader

GOOD = (
    b"POST /v1/announce HTTP/1.1\r\nHost: t\r\nX-P2PNode-Signature: ab\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


def read_all(data: bytes, step: int | None = None) -> list[Request]:
    r = RequestReader()
    out = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for c in chunks:
        r.feed(c)
        while (req := r.next_request()) is not None:
            out.append(req)
    return out


@pytest.mark.parametrize("step", [None, 1, 7])
def test_reader_whole_byte_at_a_time_and_pipelined(step: int | None) -> None:
    close = GOOD.replace(b"Host: t", b"Connection: keep-alive, close")
    reqs = read_all(GOOD + GOOD + close, step)
    assert [(r.method, r.target, r.body, r.signature) for r in reqs] == [
        (b"POST", b"/v1/announce", b"hello", "ab")
    ] * 3
    assert [r.keep_alive for r in reqs] == [True, True, False]
    assert not read_all(GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"))[0].keep_alive


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /v1/announce HTTP/2\r\n\r\n", 400),
        (b"POST /v1/announce HTTP/1.1\r\n bad: fold\r\n\r\n", 400),
        (b"POST /v1/announce HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"POST /v1/announce HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /v1/announce HTTP/1.1\r\n\r\n", 411),
        (b"POST /v1/announce HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST /v1/announce HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"POST /v1/announce HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES, 431),
    ],
)
def test_reader_refuses_what_it_does_not_support(data: bytes, status: int) -> None:
    with pytest.raises(HTTPRefusal) as err:
        read_all(data)
    assert err.value.status == status


async def roundtrip(port: int, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read responses until the server closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    raw = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                raw += chunk
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        pairs = [line.split(": ", 1) for line in lines[1:]]
        headers = {name.lower(): value for name, value in pairs}
        n = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        raw = rest[n:]
    return out


def signed(key: object, mid: bytes, port: int = 7000, **kw: object) -> tuple[bytes, str]:
    body = json.dumps(
        {
            "key": keys.format_public_key(keys.public_key_bytes(key)),  # type: ignore[arg-type]
            "ts": int(time.time()),
            "nonce": os.urandom(8).hex(),
            "app": APP,
            "manifest": mid.hex(),
            "port": port,
            **kw,
        }
    ).encode()
    return body, keys.sign(key, ANNOUNCE_DOMAIN, body).hex()  # type: ignore[arg-type]


def http(body: bytes, sig: str, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/announce HTTP/1.1\r\nHost: t\r\n"
        + extra
        + f"X-P2PNode-Signature: {sig}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def test_fast_listener_serves_announces_next_to_the_main_port(
    make_tracker: Callable[..., Tracker],
    publisher: object,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = make_tracker()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(serve_tracker, t, "127.0.0.1", 0, announce_port=0)
        )
        fast = t.fast_port
        assert fast and fast != port
        client = TrackerClient(f"http://{host}:{port}", token=ADMIN)
        await client.add_app(APP, keys.public_key_bytes(publisher))  # type: ignore[arg-type]
        m = make_manifest(1)
        await client.publish(APP, "stable", m.encode())
        a, b = keys.generate_key(), keys.generate_key()

        # the main port's answer advertises the listener; the client switches to it
        await client.announce(a, app=APP, manifest_id=m.id, port=7001, numwant=0)
        assert client.announce_url == f"http://{host}:{fast}/v1/announce"
        res = await client.announce(b, app=APP, manifest_id=m.id, port=7002)
        assert [p.port for p in res.peers] == [7001] and res.seeders == 2
        stats = (await client._http.get(client.base_url + "/v1/stats")).json()
        assert stats["releases"][0]["seeders"] == 2  # one state behind both ports
        metrics = (await client._http.get(client.base_url + "/metrics")).text
        assert 'tracker_http_requests_total{route="announce",status="200"} 2.0' in metrics

        # keep-alive: two announces and a refusal on one connection, then Connection: close
        b1, s1 = signed(a, m.id, 7001)
        b2, s2 = signed(b, m.id, 7002)
        answers = await roundtrip(
            fast, http(b1, s1) + http(b1, s1) + http(b2, s2, b"Connection: close\r\n")
        )
        assert [s for s, _, _ in answers] == [200, 409, 200]
        assert json.loads(answers[1][2])["error"] == "conflict"
        assert json.loads(answers[2][2])["peers"][0]["port"] == 7001
        assert answers[2][1]["connection"] == "close"

        # validation is the main port's: a forged signature is 403, a bad body 400
        b3, _ = signed(a, m.id)
        _, forged = signed(keys.generate_key(), m.id)
        [(status, _, body)] = await roundtrip(fast, http(b3, forged, b"Connection: close\r\n"))
        assert status == 403 and set(json.loads(body)) == {"error", "message", "fix"}
        with pytest.raises(TrackerRefusedError) as err:
            await client.announce(a, app=APP, manifest_id=os.urandom(32), port=7001)
        assert err.value.status == 404

        # anything but POST /v1/announce, and broken HTTP, is refused; the connection closes
        [(status, _, _)] = await roundtrip(fast, b"GET /v1/stats HTTP/1.1\r\n\r\n" + GOOD)
        assert status == 404
        [(status, headers, _)] = await roundtrip(fast, b"GET /v1/announce HTTP/1.1\r\n\r\n")
        assert status == 405 and headers["allow"] == "POST"
        [(status, _, _)] = await roundtrip(fast, b"POST /v1/announce HTTP/1.1\r\n\r\n")
        assert status == 411
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_fast_listener_limits_connections_idle_time_and_rate(
    make_tracker: Callable[..., Tracker],
) -> None:
    from tracker.fastpath import serve_announces

    t = make_tracker(client_rate=2.0, client_burst=2.0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_announces, t, max_connections=1, idle_timeout=0.3)
        )
        first = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.05)
        # a second connection beyond the limit is closed at once
        second = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            assert await second.receive_some(10) == b""
        # the idle one is closed after idle_timeout
        with trio.fail_after(2):
            assert await first.receive_some(10) == b""
        await first.aclose()
        await second.aclose()
        # past the per-client burst: 429 with Retry-After, before the body is even parsed
        answers = await roundtrip(
            port, GOOD + GOOD + GOOD.replace(b"Host", b"Connection: close\r\nX")
        )
        assert [s for s, _, _ in answers] == [400, 400, 429]
        assert int(answers[2][1]["retry-after"]) >= 1
        nursery.cancel_scope.cancel()


async def test_send_all_waits_when_the_socket_buffer_is_full() -> None:
    """An answer bigger than the send buffer goes out whole, waiting for the reader to drain."""
    import socket

    from tracker.fastpath import _send_all

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(1 << 20)
    got = bytearray()

    async def drain() -> None:
        while len(got) < len(data):
            await trio.lowlevel.wait_readable(b)
            got.extend(b.recv(65536))

    with a, b, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await _send_all(a, data)
    assert bytes(got) == data
