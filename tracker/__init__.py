"""The p2pnode tracker: release channels, update feed, signed announces, peer-quality reports,
stats, metrics and an operator dashboard. HTTP contract: docs/tracker-api.md."""

from __future__ import annotations

from .app import Tracker, TrackerConfig
from .server import serve_tracker
from .stores import open_tracker

__all__ = ["Tracker", "TrackerConfig", "open_tracker", "serve_tracker"]
