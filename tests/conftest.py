"""Shared fixtures: a real nginx per test, and small releases laid out like a CDN.

``nginx`` is a factory: ``nginx(root)`` starts a private nginx serving ``root`` and returns it
(see :mod:`tests.nginx`); all are stopped at the end of the test. If nginx is missing the test
fails (it does not skip), saying how to install it.

``make_release(root, files)`` writes ``files`` under ``root/<app>/<build>/files/`` with the real
chunker and returns a :class:`TestRelease` holding the chunk requests the fetcher needs.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pnode.cdn.fetcher import ChunkRequest
from p2pnode.demo.cdn import find_nginx
from p2pnode.release import layout
from p2pnode.release.chunker import chunk_stream
from p2pnode.release.manifest import Chunking
from tests.support.nginx import Nginx, NginxMissing

#: Small chunks so a few MB of test data make dozens of chunks.
TEST_CHUNKING = Chunking(min=16 * 1024, avg=64 * 1024, max=256 * 1024)


@dataclass
class TestRelease:
    __test__ = False  # not a test class, despite the name

    root: Path
    app: str
    build: int
    files: dict[str, bytes]
    requests: list[ChunkRequest]

    @property
    def file_sizes(self) -> dict[str, int]:
        return {p: len(d) for p, d in self.files.items()}

    @property
    def total(self) -> int:
        return sum(r.length for r in self.requests)

    def data_of(self, req: ChunkRequest) -> bytes:
        return self.files[req.path][req.offset : req.end]

    def disk_path(self, path: str) -> Path:
        return self.root / layout.release_dir(self.app, self.build) / "files" / path


def build_release(
    root: Path,
    files: dict[str, bytes],
    *,
    app: str = "game",
    build: int = 1,
    chunking: Chunking = TEST_CHUNKING,
) -> TestRelease:
    requests: list[ChunkRequest] = []
    for path, data in sorted(files.items()):
        dest = root / layout.release_dir(app, build) / "files" / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        for c in chunk_stream(io.BytesIO(data), chunking):
            requests.append(ChunkRequest(c.id, path, c.offset, c.length))
    return TestRelease(root, app, build, dict(files), requests)


def random_files(seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {path: rng.randbytes(n) for path, n in sizes.items()}


@pytest.fixture
def make_release(tmp_path: Path) -> Callable[..., TestRelease]:
    def make(files: dict[str, bytes], **kw: object) -> TestRelease:
        root = tmp_path / "cdn"
        root.mkdir(exist_ok=True)
        return build_release(root, files, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[Path], Nginx]]:
    started: list[Nginx] = []

    def start(root: Path) -> Nginx:
        try:
            find_nginx()
            server = Nginx(root, prefix=tmp_path / f"nginx{len(started)}")
        except NginxMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
