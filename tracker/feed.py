"""The update feed's wake-ups: long-polls and event streams wait here for a channel move.

Waiters sleep on one ``trio.Event`` that is replaced at every move (:meth:`Feed.notify`): a
publish on this process wakes them at once, one on another replica when the app's watcher
notices the registry's version moved. :meth:`Feed.until_waiting` lets a caller (the tests)
wait until a request is really parked on the feed, instead of sleeping and hoping.
"""

from __future__ import annotations

import trio

__all__ = ["Feed"]


class Feed:
    def __init__(self) -> None:
        self._changed = trio.Event()
        self._joined = trio.Event()
        #: requests waiting for the next move right now
        self.waiting = 0

    def notify(self) -> None:
        """Wake every waiter (a channel moved)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        """Until the next :meth:`notify`."""
        changed = self._changed
        self.waiting += 1
        self._joined.set()
        self._joined = trio.Event()
        try:
            await changed.wait()
        finally:
            self.waiting -= 1

    async def until_waiting(self, n: int = 1) -> None:
        """Until at least ``n`` requests wait on the feed."""
        while self.waiting < n:
            await self._joined.wait()
