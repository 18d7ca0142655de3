"""Byte ranges of release files: the chunks one range request covers, cutting a streamed
body at their boundaries, and the ``Content-Range`` a server answers with.

Sans-IO, like the plan that uses them: bytes and offsets in, chunks and numbers out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["ChunkRequest", "ChunkSplitter", "coalesce", "parse_content_range"]


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """One chunk to fetch: its blake3-256 id and where it sits in a release file."""

    id: bytes
    path: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


# --------------------------------------------------------------------------------------------
# Coalescing


def coalesce(requests: Iterable[ChunkRequest], max_bytes: int) -> list[list[ChunkRequest]]:
    """Group requests into runs adjacent in one file, each run at most ``max_bytes`` long
    (a single chunk longer than that is a run of its own). Identical requests appear once.

    The fetcher cuts runs at request time rather than with this function (the size depends on
    the rate then), but the grouping rule is the same, and this is its executable statement.
    """
    by_path: dict[str, set[ChunkRequest]] = {}
    for r in requests:
        by_path.setdefault(r.path, set()).add(r)
    runs: list[list[ChunkRequest]] = []
    for path in sorted(by_path):
        current: list[ChunkRequest] = []
        size = 0
        for r in sorted(by_path[path], key=lambda c: (c.offset, c.length, c.id)):
            if current and r.offset == current[-1].end and size + r.length <= max_bytes:
                current.append(r)
                size += r.length
            else:
                if current:
                    runs.append(current)
                current, size = [r], r.length
        if current:
            runs.append(current)
    return runs


# --------------------------------------------------------------------------------------------
# Splitting a streamed body at chunk boundaries


class ChunkSplitter:
    """Cuts a streamed response body into the chunks of one job, as their last byte arrives.

    Args:
        chunks: adjacent chunks in file order (``chunks[i].end == chunks[i+1].offset``).
        skip: body bytes to discard before the first chunk (a server that ignored Range and
            sent the file from byte 0 has ``skip = chunks[0].offset``).

    Pieces are kept as memoryviews of the caller's buffers and joined once per chunk, so each
    body byte is copied exactly once on its way to ``deliver``.
    """

    __slots__ = ("_chunks", "_have", "_index", "_parts", "_skip")

    def __init__(self, chunks: Sequence[ChunkRequest], skip: int = 0) -> None:
        for a, b in itertools.pairwise(chunks):
            if a.end != b.offset or a.path != b.path:
                raise ValueError("ChunkSplitter needs adjacent chunks of one file")
        self._chunks = chunks
        self._index = 0
        self._skip = skip
        self._parts: list[memoryview] = []
        self._have = 0

    @property
    def done(self) -> bool:
        return self._index >= len(self._chunks)

    @property
    def wanted(self) -> int:
        """Body bytes still needed to complete every chunk (skip included)."""
        if self.done:
            return 0
        rest = sum(c.length for c in self._chunks[self._index :]) - self._have
        return self._skip + rest

    def remaining(self) -> list[ChunkRequest]:
        """Chunks not completed yet."""
        return list(self._chunks[self._index :])

    def feed(self, data: bytes | memoryview) -> tuple[list[tuple[ChunkRequest, bytes]], int]:
        """Take the next piece of body; return completed ``(chunk, bytes)`` pairs and how many
        bytes of ``data`` were beyond the last chunk (surplus, to be discarded)."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        pos = 0
        n = len(view)
        if self._skip:
            step = min(self._skip, n)
            self._skip -= step
            pos = step
        out: list[tuple[ChunkRequest, bytes]] = []
        chunks = self._chunks
        while pos < n and self._index < len(chunks):
            chunk = chunks[self._index]
            take = min(chunk.length - self._have, n - pos)
            if self._have == 0 and take == chunk.length:
                # The whole chunk is inside this piece: one copy, no join.
                out.append((chunk, bytes(view[pos : pos + take])))
                self._index += 1
            else:
                self._parts.append(view[pos : pos + take])
                self._have += take
                if self._have == chunk.length:
                    out.append((chunk, b"".join(self._parts)))
                    self._parts = []
                    self._have = 0
                    self._index += 1
            pos += take
        return out, n - pos if self.done else 0


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes 0-99/1234`` -> (0, 100, 1234) (end exclusive); total None for ``*``."""
    try:
        unit, _, spec = value.strip().partition(" ")
        if unit.lower() != "bytes":
            return None
        rng, _, total = spec.partition("/")
        first, _, last = rng.partition("-")
        start, end = int(first), int(last) + 1
        tot = None if total.strip() == "*" else int(total)
    except ValueError:
        return None
    if start < 0 or end <= start or (tot is not None and end > tot):
        return None
    return start, end, tot
