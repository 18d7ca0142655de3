"""Fixtures of the node's end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pnode.demo.tracker import LocalTracker
from tests.support.e2e import ADMIN


@pytest.fixture
def tracker_url(tmp_path: Path) -> Iterator[str]:
    """A tracker process on loopback, with the end-to-end tests' admin token."""
    with LocalTracker(tmp_path / "tracker", ADMIN) as url:
        yield url
