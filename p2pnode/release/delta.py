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

Choosing (:func:`choose_patches`) is pure bookkeeping: a patch is usable only if the node
holds every base chunk it reads, and worth it only if it is smaller than the chunks it would
save fetching. The node applies what this returns and fetches the rest as chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import zstandard

from ..errors import PatchError
from .chunker import hash_chunk
from .manifest import ChunkRef, FileEntry, Manifest
from .patchmeta import Patch, window_log

__all__ = [
    "PatchPlan",
    "apply_patch",
    "choose_patches",
    "make_patch",
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


@dataclass
class PatchPlan:
    """What to apply, and what it saves: ``chunks`` are the chunk ids the chosen patches
    produce (fetch them only if a patch fails)."""

    patches: list[Patch] = field(default_factory=list)
    chunks: dict[bytes, Patch] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(p.size for p in self.patches)


def choose_patches(
    manifest: Manifest,
    wanted: Collection[bytes],
    holds: Callable[[bytes], bool],
    *,
    skip: Iterable[bytes] = (),
) -> PatchPlan:
    """Pick patches that deliver chunks of ``wanted`` for fewer bytes than fetching them.

    A patch is a candidate only if ``holds(id)`` for every base chunk it reads: a patch from a
    build the node does not hold is never chosen. Candidates go greedily by bytes saved;
    chunks a chosen patch produces stop counting for the others. ``skip``: patch ids known to
    fail (a rerun after a bad patch).
    """
    lengths = {f.path: f for f in manifest.files}
    skipped = set(skip)
    scored = []
    for p in manifest.patches:
        if p.id in skipped or not all(holds(cid) for cid, _ in p.base_chunks):
            continue
        entry = lengths[p.path]
        produces = {c.id: c.length for c in entry.chunks[p.first : p.first + p.count]}
        saves = sum(n for cid, n in produces.items() if cid in wanted)
        if saves > p.size:
            scored.append((saves - p.size, p, produces))
    scored.sort(key=lambda item: -item[0])
    plan = PatchPlan()
    for _, p, produces in scored:
        fresh = {cid: n for cid, n in produces.items() if cid in wanted and cid not in plan.chunks}
        if sum(fresh.values()) <= p.size:
            continue
        plan.patches.append(p)
        for cid in fresh:
            plan.chunks[cid] = p
    return plan
