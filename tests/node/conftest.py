"""Fixtures of the node's end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pnode.demo.cdn import LocalCDN
from p2pnode.demo.tracker import LocalTracker
from tests.support.e2e import ADMIN


@pytest.fixture
def tracker_url(tmp_path: Path) -> Iterator[str]:
    """A tracker process on loopback, with the end-to-end tests' admin token."""
    with LocalTracker(tmp_path / "tracker", ADMIN) as url:
        yield url


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[LocalCDN]:
    """A private nginx serving tmp_path/cdn (its access log counts what was asked of it)."""
    root = tmp_path / "cdn"
    root.mkdir()
    server = LocalCDN(root)
    server.start()
    try:
        yield server
    finally:
        server.close()
