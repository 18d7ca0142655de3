"""Shared fixtures: a real nginx per test, and small releases laid out like a CDN.

``nginx`` is a factory: ``nginx(root)`` starts a private nginx serving ``root`` and returns it
(see :mod:`tests.nginx`); all are stopped at the end of the test. If nginx is missing the test
fails (it does not skip), saying how to install it.

``make_release(root, files)`` writes ``files`` under ``root/<app>/<build>/files/`` with the real
chunker and returns a :class:`TestRelease` holding the chunk requests the fetcher needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from p2pnode.demo.cdn import find_nginx
from tests.support.nginx import Nginx, NginxMissing
from tests.support.release import TestRelease, build_release

# Property tests check what holds, not how fast: Hypothesis's per-example deadline (200 ms)
# failed a 2-core CI machine's loaded runs; speed lives in scripts/ benchmarks.
settings.register_profile("p2pnode", deadline=None)
settings.load_profile("p2pnode")


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
