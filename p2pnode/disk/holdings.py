"""Many installs' chunks as one index: what one node serves for every install it holds.

``p2pnode seed`` serves one install from its :class:`~p2pnode.disk.stage.LocalChunks`; the
client daemon's one node serves every install of its library, and fetches for the jobs that
stage new builds. Its index is a :class:`Holdings`: the installs as the daemon last read them
from disk (``parts``, replaced whole by each re-read), and the installs being staged right now
(``live``), which their install attaches for as long as it fetches, so a chunk it lands is
served the moment it is journaled rather than at the next re-read.
"""

from __future__ import annotations

from collections.abc import Iterable

from .stage import LocalChunks

__all__ = ["Holdings"]


class Holdings(LocalChunks):
    """A chunk is had if any part has it, and read (verified) from the first that gives it;
    the live parts (freshest) are asked first."""

    def __init__(self, parts: Iterable[LocalChunks] = ()) -> None:
        super().__init__(None)
        #: The installs as last read from disk: replaced whole (from a thread; the trio
        #: thread reads the list object whole).
        self.parts = list(parts)
        #: The installs a running job stages, each attached by its install while it fetches.
        self.live: list[LocalChunks] = []

    def attach(self, part: LocalChunks) -> None:
        """Serve ``part`` too (a job's stage, as its chunks land) until :meth:`detach`."""
        self.live = [*self.live, part]

    def detach(self, part: LocalChunks) -> None:
        self.live = [p for p in self.live if p is not part]

    def _all(self) -> list[LocalChunks]:
        return [*self.live, *self.parts]

    def has(self, chunk_id: bytes) -> bool:
        return any(p.has(chunk_id) for p in self._all())

    def read(self, chunk_id: bytes) -> bytes | None:
        for p in self._all():
            if p.has(chunk_id):
                data = p.read(chunk_id)
                if data is not None:
                    return data
        return None
