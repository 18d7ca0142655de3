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
from typing import Any

import trio
from starlette.responses import StreamingResponse

from .control import Service

__all__ = ["KEEPALIVE", "MIN_INTERVAL", "STREAM_HISTORY", "Changes", "event_stream", "streamed"]

#: Seconds between two events to one client (changes in between are sent as one).
MIN_INTERVAL = 0.25
#: Seconds of silence after which a keepalive comment is sent.
KEEPALIVE = 15.0
#: Finished jobs in a streamed snapshot (the newest; GET /jobs has them all). The queue keeps
#: 200, and sending them all four times a second to every page would cost more than the rest.
STREAM_HISTORY = 20


class Changes:
    """Wakes every waiting stream when the Service changes (one listener for all clients:
    the Service keeps its listeners for good, so streams must not each add one), and encodes
    each version's event once for all of them."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._event = trio.Event()
        self._encoded: tuple[int, bytes] = (-1, b"")
        service.on_change(self._changed)

    def encoded(self) -> tuple[int, bytes]:
        """The current version and its ``snapshot`` event."""
        version = self._service.version
        if self._encoded[0] != version:
            self._encoded = (version, _event("snapshot", streamed(self._service.snapshot())))
        return self._encoded

    def _changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next change, or ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            await self._event.wait()


def streamed(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with the history cut to the newest :data:`STREAM_HISTORY` jobs."""
    jobs = snapshot["jobs"]
    done = [j for j in jobs if j["state"] in ("installed", "cancelled")]
    if len(done) <= STREAM_HISTORY:
        return snapshot
    cut = {id(j) for j in done[STREAM_HISTORY:]}  # jobs_view lists history newest first
    return {**snapshot, "jobs": [j for j in jobs if id(j) not in cut], "history_cut": len(cut)}


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
    sent, data = changes.encoded()
    yield data
    while True:
        if service.version == sent:
            await changes.wait(keepalive)
        if service.version == sent:
            yield b": keepalive\n\n"
            continue
        sent, data = changes.encoded()
        yield data
        await trio.sleep(min_interval)  # changes meanwhile go out together in the next one


def event_stream(service: Service, changes: Changes) -> StreamingResponse:
    return StreamingResponse(
        snapshots(service, changes, min_interval=MIN_INTERVAL, keepalive=KEEPALIVE),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
