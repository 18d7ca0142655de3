"""Trackers for tests: in-process clients, a Redis server of their own, long-poll waits."""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.discovery.tracker_api import ChannelHead
from tracker import Tracker, serve_tracker
from tracker.swarm_log import LogSwarm

ADMIN = "admin-token-for-tests-0123456789"
APP = "game"


def client_for(t: Tracker, token: str | None = ADMIN, ip: str = "127.0.0.1") -> TrackerClient:
    transport = httpx.ASGITransport(app=t, client=(ip, 40000))  # type: ignore[arg-type]
    http = httpx.AsyncClient(transport=transport, base_url="http://tracker")
    return TrackerClient("http://tracker", token=token, client=http)


async def long_poll_woken(
    holder: Tracker, follower: TrackerClient, publish: Callable[[], Awaitable[object]], since: int
) -> tuple[ChannelHead, float]:
    """Long-poll ``follower`` for a release past ``since``; once the request is parked on
    ``holder``'s update feed (not after a guessed sleep), ``publish()``. Returns the head the
    long-poll got and the seconds from the publish to its answer (at most 1, else it fails)."""
    got: list[ChannelHead] = []
    woken = trio.Event()

    async def wait() -> None:
        got.append(await follower.wait_for_release(APP, "stable", since=since))
        woken.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        with trio.fail_after(5):
            await holder.feed.until_waiting()
        t0 = trio.current_time()
        await publish()
        with trio.fail_after(1.0):
            await woken.wait()
    return got[0], trio.current_time() - t0


#: The registry and operations stores the contract tests run on.
STORES = ("sqlite", "redis", "postgres")


def registry_url_for(request: pytest.FixtureRequest, store: str) -> str | None:
    """``--registry`` for a store kind: none (SQLite in DIR), a fresh redis-server, or a
    fresh PostgreSQL database (the ``redis_url`` and ``pg_url`` fixtures)."""
    if store == "sqlite":
        return None
    return str(request.getfixturevalue("redis_url" if store == "redis" else "pg_url"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A redis-server this test can stop and start again on the same port, with AOF."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (fix: bash scripts/setup.sh)")
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail("redis-server did not start within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


async def start(nursery: trio.Nursery, t: Tracker) -> TrackerClient:
    host, port = await nursery.start(functools.partial(serve_tracker, t, "127.0.0.1", 0))
    return TrackerClient(f"http://{host}:{port}", token=ADMIN)


async def synced(*trackers: Tracker) -> None:
    """In log mode, wait until every replica applied the log as far as the furthest one (the
    answers are sequential, but a replica learns of others' entries a moment later)."""
    logs = [t.swarm for t in trackers if isinstance(t.swarm, LogSwarm)]
    if not logs:
        return
    with trio.fail_after(5):
        while len({s.applied for s in logs}) > 1:
            await trio.sleep(0.01)
