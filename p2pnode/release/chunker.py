"""Content-defined chunking of files (FastCDC) with blake3 chunk ids.

Chunk boundaries depend only on content, so inserting bytes early in a file moves one or two
boundaries and leaves every later chunk, and its id, unchanged: that is what makes updates
deltas. Files are streamed in windows; the last chunk of a window may have been cut by the
window's end rather than by content, so it is carried into the next window and re-chunked.
The result is byte-for-byte the chunking of the whole file at once, without holding it.

The ``fastcdc`` package silently falls back to a pure-Python chunker about 150x slower when its
Cython module is missing, and checks its parameters with ``assert`` (design.md section 10). We
import the native module directly and check parameters ourselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import blake3

from ..errors import P2PNodeError
from .manifest import Chunking, ChunkRef

try:
    from fastcdc.fastcdc_cy import fastcdc_cy as _fastcdc
except ImportError as exc:  # pragma: no cover - depends on the installed wheel
    raise P2PNodeError(
        "the native FastCDC module (fastcdc.fastcdc_cy) is not available",
        fix="reinstall with `pip install --force-reinstall fastcdc` on a machine with a compiler",
    ) from exc

__all__ = ["WINDOW", "chunk_stream", "hash_chunk"]

#: Read size. Large enough that per-window overhead vanishes, small enough to stay cache- and
#: RSS-friendly (publishing a 10 GiB file holds at most WINDOW + max chunk in memory).
WINDOW = 16 * 1024 * 1024


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def hash_chunk(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def chunk_stream(
    f: Readable,
    params: Chunking,
    *,
    sink: Callable[[memoryview], None] | None = None,
) -> Iterator[ChunkRef]:
    """Yield the chunks of stream ``f`` in order.

    Args:
        f: a binary stream read to its end.
        params: chunk size bounds.
        sink: if given, receives every byte read, in order (lets ``publish`` copy a file
            while chunking it, so a file changing underneath cannot make copy and manifest
            disagree).
    """
    if params.max > WINDOW:
        raise ValueError("maximum chunk size exceeds the read window")
    # One buffer for the whole stream: fresh memory is slow to touch on these machines, so we
    # read into the same pages every window and move only the carried tail (< max) forward.
    buf = bytearray(WINDOW + params.max)
    whole = memoryview(buf)
    carry = 0
    base = 0
    while True:
        got = 0
        while got < WINDOW:  # readinto may return short reads before EOF
            n = f.readinto(whole[carry + got : carry + WINDOW])
            if not n:
                break
            got += n
        if sink is not None and got:
            sink(whole[carry : carry + got])
        eof = got < WINDOW
        end_of_block = carry + got
        if end_of_block == 0:
            return
        view = whole[:end_of_block]
        consumed = 0
        for c in _fastcdc(view, params.min, params.avg, params.max):
            end = c.offset + c.length
            if end == end_of_block and not eof:
                break  # possibly cut by the window, not by content: re-chunk with more data
            yield ChunkRef(hash_chunk(view[c.offset : end]), base + c.offset, c.length)
            consumed = end
        carry = end_of_block - consumed
        buf[:carry] = buf[consumed:end_of_block]
        base += consumed
        if eof:
            return
