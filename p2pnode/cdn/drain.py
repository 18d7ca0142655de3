"""A gentle stop for CDN fetches: finish the requests in flight, start no new one.

A pause cancels a job's fetches, and a cancelled range request loses every byte the server
already sent for it: the part of a chunk received so far, and what waits in the socket buffers
(a server counts those bytes as sent). Under a rate cap that is the fetch's whole in-flight
budget (at least its 512 KiB floor: a 3 MB game paused once cost 1.17x). A :class:`Drain`
lets the owner of a fetch (the daemon pausing a job) ask every :class:`CDNFetcher` running in
its task tree to take no new request, wait until the requests in flight have ended (their
chunks verified and delivered), and only then cancel, bounded by a deadline of its choosing.

The fetchers find it through :data:`DRAIN`, a context variable the owner sets in the task
that runs the fetch (trio copies it into every task spawned below). Unset (the standalone
verbs), nothing changes.
"""

from __future__ import annotations

from contextvars import ContextVar

import trio

__all__ = ["DRAIN", "Drain"]


class Drain:
    """Requests in flight under one owner, and whether the owner wants them to be the last."""

    def __init__(self) -> None:
        self.requested = False
        self.active = 0
        self._idle = trio.Event()

    def request(self) -> None:
        """Start no new request from now on."""
        self.requested = True
        self._check()

    def begin(self) -> None:
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        self._check()

    def _check(self) -> None:
        if self.requested and self.active <= 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once a drain was requested and no request is in flight."""
        await self._idle.wait()


#: The drain of the task running a fetch (None: fetches run until cancelled, as always).
DRAIN: ContextVar[Drain | None] = ContextVar("p2pnode_drain", default=None)
