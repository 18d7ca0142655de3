"""Binary delta patches: making one, applying one, and choosing which to use (sans-IO).

Theory of operation
-------------------
A patch is zstd's "patch-from" mode: the result is compressed with the base bytes loaded as a
raw-content dictionary, long-distance matching on and a window covering base and result, so
every unchanged stretch of the base costs a few bytes of match description. Both sides derive
the window from sizes the manifest gives (:func:`patchmeta.window_log`).

Patches are bounded segments (``patchmeta.MAX_PATCH_RESULT_BYTES`` of result against at most
``MAX_PATCH_BASE_BYTES`` of base), so making or applying one holds a bounded amount in memory
whatever the file's size; a multi-GiB file is many patches.

Choosing which patches to use is :mod:`p2pnode.release.deltaplan` (re-exported here): a patch
is usable only if the node holds every base chunk it reads and some source can deliver it, and
worth it only if it costs less than the chunks it would save fetching.
"""

from __future__ import annotations

from collections.abc import Sequence

import zstandard

from ..errors import PatchError
from .chunker import hash_chunk
from .deltaplan import PatchPlan, Sources, choose_patches
from .manifest import ChunkRef, FileEntry, Manifest
from .patchmeta import Patch, window_log

__all__ = [
    "PatchPlan",
    "Sources",
    "apply_patch",
    "choose_patches",
    "make_patch",
    "patch_memory",
    "pieces",
    "result_chunks",
]

#: zstd level for patches: the top levels find the most matches into the base (the benchmark's
#: reference is ``zstd -19 --long --patch-from``), and segments are small enough for it.
DEFAULT_LEVEL = 19
#: Match-finder tables this big (log2) index the whole base of a segment, not only its tail;
#: below it the low levels miss most matches into a large dictionary.
MAX_TABLE_LOG = 26


def _dictionary(base: bytes | memoryview) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def make_patch(
    base: bytes | memoryview, result: bytes | memoryview, level: int = DEFAULT_LEVEL
) -> bytes:
    """The patch turning ``base`` into ``result``."""
    wl = window_log(len(base), len(result))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(result),
        window_log=wl,
        hash_log=min(wl, MAX_TABLE_LOG),
        chain_log=min(wl, MAX_TABLE_LOG),
        enable_ldm=True,
    )
    dictionary = zstandard.ZstdCompressionDict(
        bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    compressor = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)
    return compressor.compress(result)


def patch_memory(base_len: int, result_len: int) -> int:
    """An upper bound of what :func:`make_patch` holds: zstd's hash and chain tables (4
    bytes an entry, sized as ``make_patch`` sizes them) for the compressor and again for the
    dictionary, the base three times (ours, the dictionary's copy, zstd's) and the result
    twice (with the output)."""
    wl = window_log(base_len, result_len)
    tables = 2 * 4 * ((1 << min(wl, MAX_TABLE_LOG)) * 2)
    return tables + 3 * base_len + 2 * result_len


def apply_patch(patch: bytes | memoryview, base: bytes | memoryview, result_len: int) -> bytes:
    """The result of ``patch`` over ``base``; raises PatchError unless it is exactly
    ``result_len`` bytes (the caller still checks every chunk's blake3)."""
    dictionary = zstandard.ZstdCompressionDict(
        bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    decompressor = zstandard.ZstdDecompressor(
        dict_data=dictionary, max_window_size=1 << window_log(len(base), result_len)
    )
    try:
        out = decompressor.decompress(patch, max_output_size=result_len)
    except zstandard.ZstdError as exc:
        raise PatchError(f"patch does not decode: {exc}") from None
    if len(out) != result_len:
        raise PatchError(f"patch produced {len(out)} bytes, not {result_len}")
    return out


def pieces(manifest: Manifest) -> dict[bytes, int]:
    """The swarm's index space for ``manifest``: id -> length of its unique chunks in
    first-seen order, then of its patches not already listed. Without patches (every format-1
    manifest) it is exactly the unique chunks, so the wire protocol is unchanged for them;
    only nodes that read format 2 ever join a swarm of a manifest with patches."""
    out = manifest.unique_chunks()
    for p in manifest.patches:
        out.setdefault(p.id, p.size)
    return out


def result_chunks(manifest: Manifest, patch: Patch) -> tuple[FileEntry, Sequence[ChunkRef]]:
    """The file a patch produces and its chunks, in order."""
    entry = next(f for f in manifest.files if f.path == patch.path)
    return entry, entry.chunks[patch.first : patch.first + patch.count]


def split_verified(data: bytes, chunks: Sequence[ChunkRef]) -> list[tuple[bytes, memoryview]]:
    """Cut a patch's output into its chunks, each checked with blake3; PatchError on the first
    that does not match (nothing is returned, so nothing of a bad patch is ever staged)."""
    view = memoryview(data)
    out = []
    pos = 0
    for c in chunks:
        piece = view[pos : pos + c.length]
        if len(piece) != c.length or hash_chunk(piece) != c.id:
            raise PatchError(f"patch output does not match chunk {c.id.hex()[:12]}")
        out.append((c.id, piece))
        pos += c.length
    return out
