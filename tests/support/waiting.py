"""Waiting in tests for something to happen, without a fixed sleep."""

from __future__ import annotations

from collections.abc import Callable

import trio

#: How often ``until`` looks: short, so a test waits little past the moment.
POLL = 0.01


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return as soon as ``condition()`` holds; fail (``trio.TooSlowError``) after ``timeout``.

    For counters the code under test keeps without an event to wait on (connections
    refused or closed): a fixed sleep either waits too long or, on a loaded machine, not
    long enough."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(POLL)
