"""Fixtures for the tracker tests: keys, signed manifests, an in-process tracker, redis.

``tracker`` is a :class:`tracker.Tracker` over a fresh DIR; ``client`` is a
:class:`p2pnode.discovery.tracker.TrackerClient` whose httpx transport is that app, in-process, on
trio (no sockets). ``redis_url`` starts a private ``redis-server`` on a free loopback port for
the test and stops it after; if the binary is missing the test fails with the fix. ``pg_url``
is a fresh database on the session's one PostgreSQL cluster (:mod:`tests.support.postgres`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release.metadata import ReleaseInfo
from tests.support.postgres import PostgresCluster, PostgresMissing
from tests.support.tracker import ADMIN, APP, RedisProcess, client_for, free_port
from tracker import Tracker, TrackerConfig, open_tracker


@pytest.fixture
def publisher() -> Ed25519PrivateKey:
    return keys.generate_key()


@pytest.fixture
def make_manifest(publisher: Ed25519PrivateKey) -> Callable[..., M.SignedManifest]:
    """``make_manifest(build, channel="stable", key=publisher, expires_in=3600, info=None)``."""

    def make(
        build: int,
        channel: str = "stable",
        key: Ed25519PrivateKey | None = None,
        app: str = APP,
        expires_in: int = 3600,
        size: int = 1000,
        info: ReleaseInfo | None = None,
    ) -> M.SignedManifest:
        k = key or publisher
        data = f"build {build}".encode() * (size // 8 + 1)
        data = data[:size]
        now = int(time.time())
        m = M.Manifest(
            app=app,
            version=f"1.{build}",
            build=build,
            channel=channel,
            created=now - 10,
            expires=now + expires_in,
            key=keys.public_key_bytes(k),
            files=(
                M.FileEntry(
                    "data.bin",
                    size,
                    M.MODE_FILE,
                    (M.ChunkRef(blake3.blake3(data).digest(), 0, size),),
                ),
            ),
            info=info or ReleaseInfo(),
        )
        return M.sign(m, k)

    return make


@pytest.fixture
def make_tracker(tmp_path: Path) -> Iterator[Callable[..., Tracker]]:
    made: list[Tracker] = []

    def make(
        name: str = "t",
        redis_url: str | None = None,
        prefix: str = "trk:",
        redis_mode: str = "script",
        registry_url: str | None = None,
        **kw: object,
    ) -> Tracker:
        config = TrackerConfig(admin_token=ADMIN, **kw)  # type: ignore[arg-type]
        t = open_tracker(
            config, tmp_path / name, redis_url, prefix, redis_mode, registry_url=registry_url
        )
        made.append(t)
        return t

    yield make
    for t in made:
        t.load.close()
        t.ops.close()
        t.registry.close()
        t.swarm.close()
        t.fleet.store.close()


@pytest.fixture
def tracker(make_tracker: Callable[..., Tracker]) -> Tracker:
    return make_tracker()


REGISTRATIONS: dict[int, dict[str, object]] = {}


@pytest.fixture
async def client(tracker: Tracker, publisher: Ed25519PrivateKey) -> AsyncIterator[TrackerClient]:
    """A client of ``tracker``, with the app ``APP`` already registered to ``publisher``."""
    c = client_for(tracker)
    REGISTRATIONS[id(tracker)] = await c.add_app(APP, keys.public_key_bytes(publisher))
    yield c
    REGISTRATIONS.pop(id(tracker), None)
    await c._http.aclose()


@pytest.fixture
def registered(client: TrackerClient, tracker: Tracker) -> dict[str, object]:
    """The registration answer (holds the publisher token)."""
    return REGISTRATIONS[id(tracker)]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (fix: bash scripts/setup.sh)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("redis-server did not start within 10 s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    (tmp_path / "redis").mkdir()
    r = RedisProcess(tmp_path / "redis")
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the session (initdb and start cost ~2 s); tests each get a
    database of their own on it (``pg_url``)."""
    try:
        cluster = PostgresCluster()
    except PostgresMissing as exc:
        pytest.fail(str(exc))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> str:
    """A fresh, empty database's DSN (``postgresql://postgres@127.0.0.1:PORT/tN``)."""
    return pg_cluster.new_database()
