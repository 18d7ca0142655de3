"""A content-addressed chunk store: ``store/<first 2 hex>/<64 hex>``, one file per chunk.

It keeps the chunks of earlier versions that the installed version lacks, so rollback works
offline. Every read is verified against the chunk id (a damaged chunk is deleted and reported
missing, never returned), and every write is atomic (temporary name, then rename), so a killed
process leaves either no chunk or a whole one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..release.chunker import hash_chunk
from .fsutil import fsync_dir

__all__ = ["ChunkStore"]


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._unsynced: set[Path] = set()

    def path(self, chunk_id: bytes) -> Path:
        h = chunk_id.hex()
        return self.root / h[:2] / h

    def __contains__(self, chunk_id: bytes) -> bool:
        return self.path(chunk_id).exists()

    def get(self, chunk_id: bytes) -> bytes | None:
        p = self.path(chunk_id)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        if hash_chunk(data) != chunk_id:
            p.unlink(missing_ok=True)
            return None
        return data

    def put(self, chunk_id: bytes, data: bytes | memoryview) -> None:
        """Store verified bytes; callers have checked ``hash_chunk(data) == chunk_id``."""
        p = self.path(chunk_id)
        if p.exists():
            return
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        self._unsynced.add(p.parent)

    def sync(self) -> None:
        """Make the names of chunks put so far durable."""
        for d in self._unsynced:
            fsync_dir(d)
        self._unsynced.clear()

    def ids(self) -> Iterator[bytes]:
        if not self.root.exists():
            return
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if len(f.name) == 64:
                    try:
                        yield bytes.fromhex(f.name)
                    except ValueError:
                        continue

    def retain(self, keep: Iterable[bytes]) -> int:
        """Delete every chunk not in ``keep``; returns the bytes freed."""
        wanted = set(keep)
        freed = 0
        for cid in list(self.ids()):
            if cid not in wanted:
                p = self.path(cid)
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
        for sub in self.root.iterdir() if self.root.exists() else ():
            if sub.is_dir():
                for stray in sub.glob("*.tmp"):
                    stray.unlink(missing_ok=True)
        return freed
