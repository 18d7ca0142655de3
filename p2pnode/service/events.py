"""The push stream: server-sent events of the Service's snapshot, coalesced.

Why a whole snapshot and not deltas: a client that missed an event (a reconnect, a slow tab)
needs no replay logic, and one snapshot of 50 games and their jobs is a few tens of KiB. Why
coalesced: workers report progress many times a second per job; a stream that sent one event
per change would flood a browser with a busy queue. So each client gets the snapshot on
connect, then at most one per :data:`MIN_INTERVAL` while things change, and a comment line
every :data:`KEEPALIVE` seconds while nothing does (proxies and browsers drop silent streams).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import trio
from starlette.responses import StreamingResponse

from .control import Service

__all__ = ["KEEPALIVE", "MIN_INTERVAL", "Changes", "event_stream"]

#: Seconds between two events to one client (changes in between are sent as one).
MIN_INTERVAL = 0.25
#: Seconds of silence after which a keepalive comment is sent.
KEEPALIVE = 15.0


class Changes:
    """Wakes every waiting stream when the Service changes (one listener for all clients:
    the Service keeps its listeners for good, so streams must not each add one)."""

    def __init__(self, service: Service) -> None:
        self._event = trio.Event()
        service.on_change(self._changed)

    def _changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next change, or ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            await self._event.wait()


def _event(name: str, doc: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


async def snapshots(
    service: Service,
    changes: Changes,
    *,
    min_interval: float = MIN_INTERVAL,
    keepalive: float = KEEPALIVE,
) -> AsyncIterator[bytes]:
    """The stream's bytes: ``retry``, the snapshot now, then one per burst of changes."""
    yield b"retry: 2000\n\n"
    sent = service.version
    yield _event("snapshot", service.snapshot())
    while True:
        if service.version == sent:
            await changes.wait(keepalive)
        if service.version == sent:
            yield b": keepalive\n\n"
            continue
        sent = service.version
        yield _event("snapshot", service.snapshot())
        await trio.sleep(min_interval)  # changes meanwhile go out together in the next one


def event_stream(service: Service, changes: Changes) -> StreamingResponse:
    return StreamingResponse(
        snapshots(service, changes, min_interval=MIN_INTERVAL, keepalive=KEEPALIVE),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
