"""Fixtures of the daemon's end-to-end tests: nginx for a CDN, and the node tests' tracker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pnode.demo.cdn import LocalCDN
from tests.node.conftest import tracker_url

__all__ = ["cdn", "tracker_url"]


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[LocalCDN]:
    """nginx on loopback serving tmp_path/cdn."""
    root = tmp_path / "cdn"
    root.mkdir()
    with LocalCDN(root) as server:
        yield server
