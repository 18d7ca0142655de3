"""The log mode's trio Redis client: RESP encoding, a real redis-server, and failures."""

from __future__ import annotations

import functools

import pytest
import trio

from tracker.errors import RedisUnavailable
from tracker.resp import TrioRedis, encode_command


def test_commands_are_encoded_as_arrays_of_bulk_strings() -> None:
    assert encode_command(b"XADD", "s", 12, b"") == (
        b"*4\r\n$4\r\nXADD\r\n$1\r\ns\r\n$2\r\n12\r\n$0\r\n\r\n"
    )
    assert encode_command("é") == b"*1\r\n$2\r\n\xc3\xa9\r\n"  # length in bytes, not chars


async def test_calls_against_redis_and_an_error_reply(redis_url: str) -> None:
    r = TrioRedis(redis_url, timeout=2.0)
    try:
        assert await r.call(b"SET", b"k", b"v") == b"OK"
        assert await r.call(b"GET", b"k") == b"v"
        sid = await r.call(b"XADD", b"s", b"*", b"o", b"x:1", b"n", 1, b"e", b"[]")
        got = await r.call(b"XREAD", b"COUNT", 10, b"STREAMS", b"s", b"0-0")
        assert got == [[b"s", [[sid, [b"o", b"x:1", b"n", b"1", b"e", b"[]"]]]]]
        # a blocking read that finds nothing returns None after its block time
        assert await r.call(b"XREAD", b"BLOCK", 50, b"STREAMS", b"s", sid, extra_time=0.05) is None
        with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
            await r.call(b"LPUSH", b"k", b"x")
        assert await r.call(b"GET", b"k") == b"v"  # a fresh connection after the failure
    finally:
        await r.aclose()


async def test_auth_and_db_come_from_the_url_and_every_call_is_bounded() -> None:
    """A fake server: records what arrives, answers AUTH/SELECT, and never answers GET."""
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(4096):
                seen.append(data)
                if b"AUTH" in data or b"SELECT" in data:
                    await stream.send_all(b"+OK\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0))
        port = listeners[0].socket.getsockname()[1]
        r = TrioRedis(f"redis://user:p%40ss@127.0.0.1:{port}/3", timeout=0.3)
        with trio.fail_after(3), pytest.raises(RedisUnavailable, match="did not answer within"):
            await r.call(b"GET", b"k")
        assert b"".join(seen).startswith(
            encode_command(b"AUTH", b"user", b"p@ss") + encode_command(b"SELECT", 3)
        )
        await r.aclose()
        nursery.cancel_scope.cancel()


async def test_an_unreachable_server_is_reported_by_address() -> None:
    from tests.support.tracker import free_port

    port = free_port()
    r = TrioRedis(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        await r.call(b"PING")
    with pytest.raises(RedisUnavailable, match="scheme"):
        TrioRedis("http://127.0.0.1/0")
