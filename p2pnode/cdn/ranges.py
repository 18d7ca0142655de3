"""Byte ranges of release files: the chunks one range request covers, cutting a streamed
body at their boundaries, and the ``Content-Range`` a server answers with.

Sans-IO, like the plan that uses them: bytes and offsets in, chunks and numbers out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ChunkRequest", "coalesce", "parse_content_range"]


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
