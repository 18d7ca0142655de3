"""How trio reaches the asyncio DHT layers: ``TrioAsyncioBridge`` (trio-asyncio in trio's
thread) or ``ThreadBridge`` (a plain asyncio loop in its own thread). docs/discovery.md says
which is the default and why."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

from ...errors import UsageError

__all__ = ["Bridge", "ThreadBridge", "TrioAsyncioBridge", "open_bridge"]


T = TypeVar("T")


class TrioAsyncioBridge:
    """Runs asyncio code on a trio-asyncio loop living in trio's own thread."""

    name = "trio-asyncio"

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        import trio_asyncio

        return await trio_asyncio.aio_as_trio(fn)(*args)


class ThreadBridge:
    """Runs asyncio code on a plain asyncio loop in a dedicated daemon thread.

    Results come back through ``TrioToken.run_sync_soon``, so no trio worker thread is held
    while a call is pending; cancelling the trio side cancels the asyncio task.
    """

    name = "thread"

    def __init__(self) -> None:
        # not asyncio.new_event_loop(): once trio-asyncio is imported its policy refuses to make
        # a loop from inside trio, and this loop is not trio's anyway
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="p2pnode-dht-asyncio", daemon=True
        )
        self._thread.start()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        async def run() -> T:
            return await fn(*args)

        cfut = asyncio.run_coroutine_threadsafe(run(), self.loop)

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        cfut.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            cfut.cancel()
            raise
        return cfut.result()

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        self.loop.close()


Bridge = TrioAsyncioBridge | ThreadBridge


#: Chosen by measurement: see docs/discovery.md ("Bridge").
DEFAULT_BRIDGE = "thread"


@contextlib.asynccontextmanager
async def open_bridge(kind: str = DEFAULT_BRIDGE) -> AsyncIterator[Bridge]:
    """Open a bridge from trio to asyncio: ``"thread"`` or ``"trio-asyncio"``."""
    if kind == "trio-asyncio":
        import trio_asyncio

        async with trio_asyncio.open_loop() as loop:
            yield TrioAsyncioBridge(loop)
    elif kind == "thread":
        bridge = ThreadBridge()
        try:
            yield bridge
        finally:
            # Shielded: the bridge is usually closed because its owner was cancelled, and an
            # unshielded await would be cancelled at once, leaving the loop's thread running.
            # close() is bounded (it joins the thread for at most 5 s).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(bridge.close)
    else:
        raise UsageError(f"unknown DHT bridge {kind!r}", fix="use 'thread' or 'trio-asyncio'")
