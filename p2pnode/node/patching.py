"""Planning and applying delta patches while assembling a stage (the Delta Processor).

Theory of operation
-------------------
:func:`patch_phase` plans first (``release.deltaplan``): what the connected peers hold comes
from their bitfields (``SwarmNode.survey``, bounded), whether the CDN can deliver from the
policy, the mirrors and this install's experience of them; a patch is taken only if its base
chunks are held here, some source can deliver it and it costs less than the chunks it
produces. The chosen patches are then fetched from peers first
(patches are pieces of the swarm like chunks: ``delta.pieces``), then what peers did not give
from the CDN's patch pack by range (``layout.patch_pack_path``), each checked against its
blake3 id exactly as a chunk is (a peer serving bad bytes is scored down and banned as for
chunks). A verified patch is kept in the chunk store, so this node serves it to peers while
the build is installed (``switch.harvest`` keeps it). It is applied in a worker thread: the
base is rebuilt from verified local reads of its chunks, the patch is decoded into at most
``patchmeta.MAX_PATCH_RESULT_BYTES``, and the output is cut into its chunks, *every one*
checked with blake3 before any is staged (``delta.split_verified``). Staged chunks go through
the same ``put`` as fetched ones: written, then journaled, so a process killed mid-apply
resumes with what was journaled and re-plans the rest.

A patch that cannot be had (every mirror failed it, or served bytes that fail its id; the
fetcher scores those mirrors down as it does for chunks) or cannot be applied (a base chunk
no longer reads back, a decoding error, an output chunk that does not match) is dropped, and
the chunks it was to produce are returned to be fetched as chunks: the update still
completes, and nothing a bad patch made reaches the stage. Before they are, the planner runs
again over them with what this round taught (the round's patches are skipped; a CDN that gave
nothing is down; the rates measured from peers and the CDN), so a chunk another patch can
still make cheaper is not fetched whole; after :data:`MAX_ROUNDS` rounds the rest are chunks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from ..disk.stage import LocalChunks, Stage
from ..errors import CDNError, PatchError
from ..release import layout
from ..release import manifest as M
from ..release.delta import apply_patch, result_chunks, split_verified
from ..release.deltaplan import PatchPlan, Sources, choose_patches
from ..release.patchmeta import Patch
from .result import InstallResult, add_mirror_stats
from .sources import cdn_options

if TYPE_CHECKING:
    from ..cdn.ranges import ChunkRequest
    from .options import InstallOptions
    from .peers import Swarm

__all__ = ["MAX_ROUNDS", "Round", "apply_patches", "patch_phase"]

#: Plans made per install at most: the first, and re-plans after patches failed.
MAX_ROUNDS = 3


@dataclass
class Round:
    """What one round of fetching and applying patches left and taught."""

    left: list[bytes] = field(default_factory=list)  # chunk ids of the patches that failed
    cdn_down: bool = False  # the CDN was asked and gave no byte
    peer_rate: float | None = None  # bytes/s measured from peers, if they gave any
    cdn_rate: float | None = None


async def patch_phase(
    stage: Stage,
    wanted: list[bytes],
    local: LocalChunks,
    mirrors: list[str],
    options: InstallOptions,
    put: Callable[[bytes, bytes | memoryview], None],
    advance: Callable[[int], None],
    result: InstallResult,
    swarm: Swarm | None = None,
) -> list[bytes]:
    """Make what of chunk ids ``wanted`` patches make cheaper (see the module); return the
    chunk ids left to fetch as chunks, in ``wanted``'s order."""
    manifest = stage.manifest
    todo, skip = set(wanted), set[bytes]()
    if not choose_patches(manifest, todo, local.has).patches:
        return wanted  # no patch worth it even if every source had it: nothing to ask peers
    sources = await _sources(stage.manifest, mirrors, options, swarm)
    if not (sources.cdn or sources.peers):
        return wanted
    for _ in range(MAX_ROUNDS):
        plan = choose_patches(manifest, todo, local.has, skip=skip, sources=sources)
        if not plan.patches:
            break
        r = await apply_patches(stage, plan, local, mirrors, options, put, advance, result, swarm)
        todo -= set(plan.chunks)
        todo.update(r.left)
        if not r.left:
            break  # the plan held: the chunks left were never worth a patch
        skip |= {p.id for p in plan.patches}  # failed, or applied (not fetched twice)
        sources = replace(
            sources,
            cdn=sources.cdn and not r.cdn_down,
            peer_rate=r.peer_rate or sources.peer_rate,
            cdn_rate=r.cdn_rate or sources.cdn_rate,
        )
    return [cid for cid in wanted if cid in todo]


async def _sources(
    manifest: M.Manifest, mirrors: list[str], options: InstallOptions, swarm: Swarm | None
) -> Sources:
    """What can deliver pieces of ``manifest`` as this node knows before fetching: the CDN
    if the policy allows it and there are mirrors; the connected peers' bitfields."""
    peers: dict[bytes, int] = {}
    if swarm is not None and swarm.peers and options.policy.asks_peers:
        peers = await swarm.node.survey(manifest, swarm.peers)
    return Sources(cdn=bool(mirrors) and options.policy.uses_cdn, peers=peers)


async def apply_patches(
    stage: Stage,
    plan: PatchPlan,
    local: LocalChunks,
    mirrors: list[str],
    options: InstallOptions,
    put: Callable[[bytes, bytes | memoryview], None],
    advance: Callable[[int], None],
    result: InstallResult,
    swarm: Swarm | None = None,
) -> Round:
    """Fetch (peers, then the CDN, as the policy allows) and apply ``plan``'s patches; the
    round's outcome names the chunks left (those of patches that failed)."""
    manifest = stage.manifest
    by_id: dict[bytes, list[Patch]] = {}
    for p in plan.patches:
        by_id.setdefault(p.id, []).append(p)
    applied: set[Patch] = set()
    done = Round()

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

    def keep_and_apply(pid: bytes, blob: bytes) -> int:
        if local.store is not None and pid not in local.store:
            local.store.put(pid, blob)  # verified on arrival; served to peers from here
        total = 0
        for p in by_id[pid]:
            try:
                staged = apply_one(p, blob)
            except PatchError:
                continue  # its chunks are fetched as chunks
            applied.add(p)
            advance(staged)
            total += staged
        return total

    async def take(pid: bytes, blob: bytes) -> None:
        # Shielded: the swarm's fetch ends (cancels) as soon as its last piece is received,
        # which may be while an earlier one is still being applied here.
        with trio.CancelScope(shield=True):
            result.bytes_patched += await trio.to_thread.run_sync(keep_and_apply, pid, blob)
        if swarm is not None:
            swarm.node.have(pid)

    async def from_peer(pid: bytes, data: bytes) -> None:
        result.bytes_patches += len(data)
        result.bytes_patches_peers += len(data)
        await take(pid, data)

    async def from_cdn(req: ChunkRequest, data: bytes | memoryview) -> None:
        await take(req.id, bytes(data))  # (a copy: the fetcher reuses its buffer)

    wanted = list(by_id)
    if swarm is not None and swarm.peers and options.policy.asks_peers:
        t0, before = trio.current_time(), result.bytes_patches_peers
        left = await swarm.node.fetch(manifest, wanted, swarm.peers, from_peer, result.peers)
        wanted = [pid for pid in wanted if pid in left]
        done.peer_rate = _rate(result.bytes_patches_peers - before, trio.current_time() - t0)
    if wanted and mirrors and options.policy.uses_cdn:
        t0, before = trio.current_time(), result.bytes_patches
        await _from_cdn(manifest, wanted, by_id, mirrors, options, from_cdn, result)
        got = result.bytes_patches - before
        done.cdn_down = got == 0
        done.cdn_rate = _rate(got, trio.current_time() - t0)
    result.patches_applied += len(applied)
    result.patches_failed += len(plan.patches) - len(applied)
    result.patched.update(cid for cid, p in plan.chunks.items() if p in applied)
    done.left = [cid for cid, p in plan.chunks.items() if p not in applied]
    return done


def _rate(got: int, seconds: float) -> float | None:
    return got / seconds if got > 0 and seconds > 0 else None


async def _from_cdn(
    manifest: M.Manifest,
    wanted: list[bytes],
    by_id: dict[bytes, list[Patch]],
    mirrors: list[str],
    options: InstallOptions,
    deliver: Callable[[ChunkRequest, bytes | memoryview], Awaitable[None]],
    result: InstallResult,
) -> None:
    """Patches ``wanted`` from the mirrors' patch pack, by range; those no mirror serves
    right stay undelivered (the caller fetches their chunks instead)."""
    from ..cdn.fetcher import CDNFetcher
    from ..cdn.ranges import ChunkRequest

    requests = [
        ChunkRequest(pid, layout.PATCH_PACK, by_id[pid][0].offset, by_id[pid][0].size)
        for pid in wanted
    ]
    fetcher = CDNFetcher(
        app=manifest.app,
        build=manifest.build,
        mirrors=mirrors,
        file_sizes={layout.PATCH_PACK: max(p.offset + p.size for p in manifest.patches)},
        options=cdn_options(options),
        limiter=options.limiter,
        area="patches",
    )
    try:
        await fetcher.fetch(requests, deliver)
    except CDNError:
        pass  # the patches that could not be had fall back to chunks
    finally:
        result.bytes_patches += fetcher.stats.bytes_received
        for name, ms in fetcher.stats.per_mirror.items():
            add_mirror_stats(result.mirrors.setdefault(name, {}), vars(ms))
