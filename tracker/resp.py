"""A small Redis client on trio, for the log mode's hot path (``XADD`` and ``XREAD``).

Theory of operation
-------------------
redis-py is synchronous, so every call from the trio thread used to be a hop to a worker
thread and back (``trio.to_thread.run_sync``): thread wake-ups, GIL hand-offs and redis-py's
own per-command machinery (connection pool, retries, response callbacks). In log mode that is
two calls per group commit (the committer's ``XADD``, the reader's ``XREAD``), and it cost more
tracker CPU than the announces' own work. Redis's protocol (RESP) is simple enough to speak
directly on a trio stream:

* :func:`encode_command` turns a command into its RESP bytes (an array of bulk strings);
  replies are parsed by ``hiredis.Reader`` (C; already a dependency), which, like h11, only
  takes bytes in (``feed``) and hands complete replies out (``gets``, ``False`` = need more).
* :class:`TrioRedis` is the I/O shell: one connection, opened on first use (with ``AUTH`` and
  ``SELECT`` as the URL says), one command at a time (the log mode gives each task its own
  connection). Every call is bounded (``timeout``, plus the ``BLOCK`` time a caller adds);
  any failure (refused connection, timeout, an error reply, cancellation mid-call) closes the
  connection, so the next call starts on a fresh one and never reads a stale reply, and is
  raised as :class:`RedisUnavailable` naming the server. After ``HEALTH_CHECK_IDLE`` seconds
  without use the connection is checked with a ``PING`` first (as redis-py does), so a
  change is not lost to a connection the server dropped while idle.

Snapshots, the snapshot lock and trimming (once a minute) stay on redis-py in a worker thread.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import trio

from .errors import RedisUnavailable

__all__ = ["RedisUnavailable", "TrioRedis", "encode_command"]

#: A connection unused for this long is checked with PING before the next command (redis-py's
#: ``health_check_interval`` as the tracker set it).
HEALTH_CHECK_IDLE = 30.0
READ_SIZE = 65536


def encode_command(*args: bytes | str | int) -> bytes:
    """One command in RESP: ``*<n>`` then each argument as a bulk string."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class TrioRedis:
    """One Redis connection driven from trio (see the module docstring).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS, verified
            with the system's CA store) or ``unix://path[?db=N]``.
        timeout: seconds each call (and connecting) may take at most.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        u = urlsplit(url)
        if u.scheme not in ("redis", "rediss", "unix"):
            raise RedisUnavailable(
                f"the Redis URL {url!r} has scheme {u.scheme!r}",
                fix="use redis://host:port/db, rediss://host:port/db or unix:///path",
            )
        self.scheme = u.scheme
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self.path = unquote(u.path) if u.scheme == "unix" else ""
        db = u.path.lstrip("/") if u.scheme != "unix" else ""
        for part in u.query.split("&"):
            name, _, value = part.partition("=")
            if name == "db":
                db = value
        self.db = int(db) if db else 0
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        self.where = self.path if u.scheme == "unix" else f"{self.host}:{self.port}"
        self.timeout = timeout
        self._stream: trio.abc.Stream | None = None
        self._reader: Any = None
        self._last_used = 0.0
        self._busy = False

    async def call(self, *args: bytes | str | int, extra_time: float = 0.0) -> Any:
        """Send one command and return its reply (bytes, int, list or None).

        ``extra_time``: seconds on top of ``timeout`` (a blocking command's block time).

        Raises:
            RedisUnavailable: connecting, sending or reading failed or took too long, or
                Redis answered with an error.
        """
        if self._busy:
            raise RuntimeError("TrioRedis: one command at a time per connection")
        self._busy = True
        try:
            now = trio.current_time()
            # a plain cancel scope: trio.fail_after is a generator-based context manager,
            # measurably dearer on a path taken twice per group commit
            with trio.CancelScope(deadline=now + self.timeout + extra_time) as scope:
                if self._stream is None:
                    await self._connect()
                elif now - self._last_used > HEALTH_CHECK_IDLE:
                    await self._roundtrip(encode_command(b"PING"))
                reply = await self._roundtrip(encode_command(*args))
            if scope.cancelled_caught:
                await self.aclose()
                raise RedisUnavailable(
                    f"Redis at {self.where} did not answer within {self.timeout + extra_time:g} s"
                )
            self._last_used = trio.current_time()
            return reply
        except (OSError, trio.BrokenResourceError, hiredis.ProtocolError) as exc:
            await self.aclose()
            raise RedisUnavailable(
                f"the connection to Redis at {self.where} failed: {exc}"
            ) from exc
        except BaseException:  # cancelled mid-call, or an error reply: start over next time
            await self.aclose()
            raise
        finally:
            self._busy = False

    async def _connect(self) -> None:
        if self.scheme == "unix":
            stream: trio.abc.Stream = await trio.open_unix_socket(self.path)
        else:
            stream = await trio.open_tcp_stream(self.host, self.port)
            if self.scheme == "rediss":
                stream = trio.SSLStream(
                    stream, ssl.create_default_context(), server_hostname=self.host
                )
        self._stream, self._reader = stream, hiredis.Reader()
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            await self._roundtrip(encode_command(b"AUTH", *auth))
        if self.db:
            await self._roundtrip(encode_command(b"SELECT", self.db))

    async def _roundtrip(self, data: bytes) -> Any:
        stream, reader = self._stream, self._reader
        assert stream is not None
        await stream.send_all(data)
        while True:
            reply = reader.gets()
            if reply is not False:
                break
            chunk = await stream.receive_some(READ_SIZE)
            if not chunk:
                raise RedisUnavailable(f"Redis at {self.where} closed the connection")
            reader.feed(chunk)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisUnavailable(f"Redis at {self.where} refused {data[:40]!r}: {reply}")
        return reply

    async def aclose(self) -> None:
        """Close the connection (the next call opens a new one)."""
        stream, self._stream, self._reader = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
