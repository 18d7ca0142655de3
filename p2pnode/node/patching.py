"""Applying delta patches while assembling a stage (the Delta Processor).

Theory of operation
-------------------
``release.delta.choose_patches`` has picked patches whose base chunks this node holds and
that cost fewer bytes than the chunks they produce. Here they are fetched from the CDN's
patch pack by range (``layout.patch_pack_path``), each checked against its blake3 id by the
fetcher exactly as a chunk is, then applied in a worker thread: the base is rebuilt from
verified local reads of its chunks, the patch is decoded into at most
``patchmeta.MAX_PATCH_RESULT_BYTES``, and the output is cut into its chunks, *every one*
checked with blake3 before any is staged (``delta.split_verified``). Staged chunks go through
the same ``put`` as fetched ones: written, then journaled, so a process killed mid-apply
resumes with what was journaled and re-plans the rest.

A patch that cannot be had (every mirror failed it, or served bytes that fail its id; the
fetcher scores those mirrors down as it does for chunks) or cannot be applied (a base chunk
no longer reads back, a decoding error, an output chunk that does not match) is dropped, and
the chunks it was to produce are returned to be fetched as chunks: the update still
completes, and nothing a bad patch made reaches the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..disk.stage import LocalChunks, Stage
from ..errors import CDNError
from ..release import layout
from ..release.delta import PatchError, PatchPlan, apply_patch, result_chunks, split_verified
from ..release.patchmeta import Patch
from .result import InstallResult, add_mirror_stats
from .sources import cdn_options

if TYPE_CHECKING:
    from ..cdn.ranges import ChunkRequest
    from .options import InstallOptions

__all__ = ["apply_patches"]


async def apply_patches(
    stage: Stage,
    plan: PatchPlan,
    local: LocalChunks,
    mirrors: list[str],
    options: InstallOptions,
    put: Callable[[bytes, bytes | memoryview], None],
    advance: Callable[[int], None],
    result: InstallResult,
) -> list[bytes]:
    """Fetch and apply ``plan``'s patches; return the chunk ids left to fetch as chunks
    (those of patches that failed)."""
    from ..cdn.fetcher import CDNFetcher
    from ..cdn.ranges import ChunkRequest

    manifest = stage.manifest
    by_id: dict[bytes, list[Patch]] = {}
    for p in plan.patches:
        by_id.setdefault(p.id, []).append(p)
    applied: set[Patch] = set()

    def apply_one(p: Patch, data: bytes) -> int:
        """Stage what ``p`` produces; returns bytes staged, or raises PatchError."""
        pieces = []
        for cid, length in p.base_chunks:
            piece = local.read(cid)
            if piece is None or len(piece) != length:
                raise PatchError(f"base chunk {cid.hex()[:12]} no longer reads back")
            pieces.append(piece)
        _, chunks = result_chunks(manifest, p)
        out = apply_patch(data, b"".join(pieces), sum(c.length for c in chunks))
        staged = 0
        for cid, view in split_verified(out, chunks):  # every chunk checked before any is put
            if plan.chunks.get(cid) is p:
                put(cid, view)
                staged += len(view)
        return staged

    async def deliver(req: ChunkRequest, data: bytes | memoryview) -> None:
        blob = bytes(data)  # the fetcher reuses its buffer once this returns
        for p in by_id[req.id]:
            try:
                staged = await trio.to_thread.run_sync(apply_one, p, blob)
            except PatchError:
                continue  # its chunks are fetched as chunks
            applied.add(p)
            advance(staged)

    requests = [
        ChunkRequest(pid, layout.PATCH_PACK, ps[0].offset, ps[0].size) for pid, ps in by_id.items()
    ]
    pack_size = max(p.offset + p.size for p in manifest.patches)
    fetcher = CDNFetcher(
        app=manifest.app,
        build=manifest.build,
        mirrors=mirrors,
        file_sizes={layout.PATCH_PACK: pack_size},
        options=cdn_options(options),
        limiter=options.limiter,
        area="patches",
    )
    try:
        await fetcher.fetch(requests, deliver)
    except CDNError:
        pass  # the patches that could not be had fall back to chunks below
    finally:
        result.bytes_patches += fetcher.stats.bytes_received
        for name, ms in fetcher.stats.per_mirror.items():
            add_mirror_stats(result.mirrors.setdefault(name, {}), vars(ms))
    result.patches_applied += len(applied)
    result.patches_failed += len(plan.patches) - len(applied)
    left = [cid for cid, p in plan.chunks.items() if p not in applied]
    result.patched.update(cid for cid, p in plan.chunks.items() if p in applied)
    return left
