"""Install, update and roll back a release, atomically and resumably.

Theory of operation
-------------------
1. **Trust first.** The manifest is fetched (size-bounded), parsed and verified (pinned key,
   signature, expiry), checked against this node (``min_client``, platforms:
   ``release.compat``) and against the installed version (same app, no downgrade) before
   anything on disk is touched.
2. **Plan.** Every unique chunk of the new version is either already in the stage (journal),
   somewhere local (the installed version's files, the chunk store), or fetched from the CDN.
   Local copies and CDN fetches run at the same time; every chunk is verified before it is
   written into the stage.
3. **Switch.** The stage is made durable, its inode recorded in ``state.json`` as a pending
   switch, and it is exchanged with the install directory in one ``renameat2`` call. Whatever
   moment a process dies, the install directory is the complete old or the complete new tree;
   the next run reads the pending record and finishes (or forgets) the switch.
4. **Harvest.** The user's files in the old tree are carried into the new one
   (``disk/userfiles.py``); chunks of kept versions that the new version lacks are copied from
   the old tree into the chunk store, then the old tree is deleted. Rollback rebuilds an earlier
   version from the current tree plus the store, offline.

Recovery
--------
``pending = {"op": "switch", "inode": N, ...}``: if the install directory's inode is N the
switch happened and is completed; otherwise it did not, and the stage stays for the next
install to resume. ``pending = {"op": "harvest"}``: harvest again (it is idempotent).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import trio

from ..cdn.manifest import read_manifest
from ..cdn.mirrors import resolve_mirrors
from ..disk import snapshot
from ..disk.stage import Journal, LocalChunks, Stage
from ..disk.state import InstallState, StateDir
from ..disk.store import ChunkStore
from ..disk.switch import (
    check_space,
    installed,
    local_chunks,
    recover,
    refuse_foreign_directory,
    rollback_target,
    switch,
)
from ..errors import DiskSpaceError, NoRollbackError, most_telling
from ..progress import NullProgress, Progress
from ..release import keys
from ..release import manifest as M
from ..release.compat import check_compatible
from ..release.trust import Offer, judge_offer, trusted_keys
from .options import InstallOptions, SourcePolicy
from .patching import patch_phase
from .peers import Swarm, open_swarm
from .result import InstallResult
from .rotations import InstallKeys, chain_read, held_rotations, install_sources, key_ring
from .sources import fetch_missing

__all__ = [
    "InstallOptions",
    "InstallResult",
    "Progress",
    "SourcePolicy",
    "assemble",
    "install",
    "install_and_seed",
    "rollback",
]


async def install(
    location: str,
    dest: Path,
    trusted: Sequence[bytes],
    options: InstallOptions | None = None,
    progress: Progress | None = None,
    *,
    manifest_data: bytes | None = None,
) -> InstallResult:
    """Install or update the release whose signed manifest is at ``location`` into ``dest``.

    ``manifest_data``: the signed manifest already fetched (from a tracker); ``location`` then
    only names where it came from, and mirrors come from the manifest and ``options``.
    """
    options = options or InstallOptions()
    return await _install(location, dest, trusted, options, progress, manifest_data, None)


async def install_and_seed(
    location: str,
    dest: Path,
    trusted: Sequence[bytes],
    options: InstallOptions,
    progress: Progress | None = None,
    *,
    manifest_data: bytes | None = None,
    task_status: trio.TaskStatus[InstallResult] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``install``, then serve what it installed until cancelled: ``install --seed`` and
    ``watch --listen`` (start it with ``nursery.start``: the install's result comes back once
    the build is in place and served from there).

    The install lock is held while serving, so nothing else changes ``dest`` under the
    served index. With nothing to serve on (no ``listen``, peers or discovery) it returns
    once installed.
    """
    result = await _install(location, dest, trusted, options, progress, manifest_data, task_status)
    task_status.started(result)  # (reached only when there was nothing to serve on)


async def _install(
    location: str,
    dest: Path,
    trusted: Sequence[bytes],
    options: InstallOptions,
    progress: Progress | None,
    manifest_data: bytes | None,
    seed: trio.TaskStatus[InstallResult] | None,
) -> InstallResult:
    """The install; with ``seed``, once it is done and something serves it, ``seed`` gets
    the result and this serves until cancelled (it never returns)."""
    t0 = time.monotonic()
    sd = StateDir(dest)
    data = manifest_data if manifest_data is not None else await read_manifest(location)
    signed = M.parse_signed(data, source=location)
    before = sd.load() if sd.exists else None
    pinned = before.trusted if before else ()
    held = held_rotations(sd, before) if before else []
    m = signed.manifest
    sources = install_sources(location, options.tracker, m.app)
    trust = trusted_keys(trusted, pinned)
    fresh = options.key_chain is not None and options.key_chain != chain_read(sd)
    ring = await key_ring(m.app, m.key, trust, held, sources, fetch=fresh)
    manifest = ring.verify(signed, now=options.now)
    check_compatible(manifest)  # a build this node cannot run: say so before fetching any of it
    refuse_foreign_directory(sd)
    with sd:
        state = sd.load()
        await trio.to_thread.run_sync(recover, sd, state)
        current = sd.load_manifest(state.current) if state.current else None
        offer = judge_offer(manifest, current, dest, require_installed=options.require_installed)
        # The state may say "installed" of a tree that was deleted or edited since.
        reinstall = await _damaged(sd, current) if current and offer is Offer.UNCHANGED else None
        if offer is Offer.UNCHANGED and current is not None and reinstall != "gone":
            if reinstall == "repair":  # what `verify --repair` would do, then as unchanged
                from .verify import heal

                result = await heal(sd, state, current, options, progress or NullProgress())
            else:
                result = InstallResult("unchanged", manifest, current.build, manifest.total_size)
            result.seconds = time.monotonic() - t0
            if seed is not None:
                await _serve_unchanged(sd, state, signed, manifest, options, result, seed)
            return result
        state.app = manifest.app
        state.trusted = sorted({*state.trusted, keys.format_public_key(manifest.key)})
        learnt = [r.encode().hex() for r in ring.learned]
        state.rotations = [*state.rotations, *(r for r in learnt if r not in state.rotations)]
        origin = location if manifest_data is None else None
        mirrors = resolve_mirrors(options.mirrors, origin, manifest, state.mirrors)
        state.mirrors = mirrors[:8]  # for repair and rollback when chunks must be refetched
        history = [state.current] if state.current and not reinstall else []
        app_keys = InstallKeys(sd, manifest.app, trust, options.tracker)
        async with open_swarm(sd, state, manifest, options, signed=signed, keys=app_keys) as swarm:
            result = await _apply(
                sd,
                state,
                signed,
                manifest,
                current,
                mirrors,
                options,
                progress or NullProgress(),
                history + state.history,
                swarm,
            )
            result.action = "reinstalled" if reinstall else "updated" if current else "installed"
            result.seconds = time.monotonic() - t0
            if swarm is not None:
                if seed is not None:  # the tree moved into place: serve it from there
                    swarm.node.local = local_chunks(sd, sd.load())
                await _served(swarm, options, result, seed)
        return result


async def _damaged(sd: StateDir, current: M.Manifest) -> str | None:
    """None if the install directory holds ``current`` (disk/snapshot.py), else "repair"
    (files are missing or damaged) or "gone" (the directory is)."""
    health = await trio.to_thread.run_sync(snapshot.check, sd, current)
    return None if health.ok else "gone" if health.gone else "repair"


async def _served(
    swarm: Swarm,
    options: InstallOptions,
    result: InstallResult,
    seed: trio.TaskStatus[InstallResult] | None,
) -> None:
    """Fill in where ``result``'s node serves and how discovery went; with ``seed``, hand it
    the result and serve until cancelled."""
    result.listen_port = swarm.node.listen_port if options.listen else None
    if swarm.discovery is not None:
        result.discovery = swarm.discovery.summary()
    if seed is not None:
        seed.started(result)
        await trio.sleep_forever()


async def _serve_unchanged(
    sd: StateDir,
    state: InstallState,
    signed: M.SignedManifest,
    manifest: M.Manifest,
    options: InstallOptions,
    result: InstallResult,
    seed: trio.TaskStatus[InstallResult],
) -> None:
    """Seeding the build already installed (a restarted seeder, ``watch`` starting up):
    nothing to fetch, so serve at once instead of waiting for discovery's first answer."""
    async with open_swarm(
        sd, state, manifest, replace(options, discovery_wait=0.0), signed=signed
    ) as swarm:
        if swarm is None:  # nothing to serve on: no --listen, peers or discovery
            return
        swarm.result = result
        if swarm.more_peers is not None:
            swarm.more_peers.close()  # nothing to fetch: discovery only announces from now on
        await _served(swarm, options, result, seed)


async def rollback(
    dest: Path,
    options: InstallOptions | None = None,
    progress: Progress | None = None,
    to: int | None = None,
) -> InstallResult:
    """Go back to kept build ``to``, or the newest kept build older than the installed one;
    offline when its chunks are kept."""
    options = options or InstallOptions()
    t0 = time.monotonic()
    async with installed(dest) as (sd, state, current):
        if not state.history:
            raise NoRollbackError(f"{dest} keeps no version earlier than the installed one")
        builds = {mid: sd.load_manifest(mid).build for mid in state.history}
        target = rollback_target(state, builds, current.build, to)
        signed = sd.load_signed(target)
        manifest = M.verify(signed, trusted_keys((), state.trusted), check_expiry=False)
        mirrors = resolve_mirrors(options.mirrors, None, manifest, state.mirrors)
        result = await _apply(
            sd,
            state,
            signed,
            manifest,
            current,
            mirrors,
            options,
            progress or NullProgress(),
            [current.id.hex(), *(h for h in state.history if h != target)],
        )
        result.action = "rolled-back"
        result.seconds = time.monotonic() - t0
        return result


async def _apply(
    sd: StateDir,
    state: InstallState,
    signed: M.SignedManifest,
    manifest: M.Manifest,
    current: M.Manifest | None,
    mirrors: list[str],
    options: InstallOptions,
    progress: Progress,
    history_after: list[str],
    swarm: Swarm | None = None,
) -> InstallResult:
    """Assemble ``manifest`` in the stage from local chunks, peers and the CDN, then switch."""
    result = InstallResult(
        "",
        manifest,
        current.build if current else None,
        manifest.total_size,
        previous_id=current.id if current else None,
    )
    if swarm is not None:
        swarm.result = result
    if options.watch_result is not None:
        options.watch_result(result)
    sd.keep_manifest(signed)  # names the stage's content (see local_chunks); harvest prunes it
    stage = Stage(sd.stage, manifest, manifest.files)
    journal = Journal(sd.journal, manifest.id)
    journal.open()
    if not journal.done and sd.stage.exists():
        stage.remove()  # a stage for another version, or with nothing verified in it
    if journal.rebooted:
        bad = await trio.to_thread.run_sync(stage.recheck, list(journal.done))
        journal.forget(bad)
    local = LocalChunks(ChunkStore(sd.store_dir))
    if current is not None:
        local.add_tree(sd.dest, current)
    on_chunk = None
    if swarm is not None:
        serving = swarm.local

        def on_chunk(cid: bytes) -> None:  # serve what just landed, while still installing
            for path, offset, length in stage.locations[cid]:
                serving.add(cid, stage.root / path, offset, length)
            # Runs in a writer thread: tell connected peers from the trio thread.
            trio.from_thread.run_sync(swarm.node.have, cid)

    await assemble(
        stage, journal, local, mirrors, options, progress, result, sd.root, on_chunk, swarm
    )
    if options.before_switch is not None:
        await options.before_switch()  # the stage is complete and journaled: safe to wait
    carried = await trio.to_thread.run_sync(
        switch, sd, state, signed, history_after, options.keep_versions
    )
    result.kept_user_files, result.displaced = carried.kept, carried.displaced
    result.not_kept = carried.not_kept
    return result


async def assemble(
    stage: Stage,
    journal: Journal,
    local: LocalChunks,
    mirrors: list[str],
    options: InstallOptions,
    progress: Progress,
    result: InstallResult,
    space_root: Path,
    on_chunk: Callable[[bytes], None] | None = None,
    swarm: Swarm | None = None,
) -> None:
    """Fill ``stage`` with every chunk it lacks: local verified copies and CDN fetches run
    concurrently; each chunk is written, then journaled, then reported to ``on_chunk`` (which
    the swarm uses to tell peers it has it). Closes the journal."""
    manifest = stage.manifest
    unique = {cid: locs[0][2] for cid, locs in stage.locations.items()}
    check_space(space_root, stage, {c: n for c, n in unique.items() if c not in journal.done})
    lost = await trio.to_thread.run_sync(stage.prepare)
    if lost & journal.done:
        journal.forget(lost)
    needed = {cid: n for cid, n in unique.items() if cid not in journal.done}
    result.bytes_resumed = sum(n for cid, n in unique.items() if cid in journal.done)
    progress.start(sum(unique.values()), f"{manifest.app} {manifest.version}")
    progress.advance(result.bytes_resumed)

    def put(cid: bytes, data: bytes | memoryview) -> None:
        try:
            stage.write_chunk(cid, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    f"the disk holding {space_root.parent} filled up while staging"
                    " (progress is kept; rerun after freeing space)"
                ) from exc
            raise
        journal.record(cid)
        if on_chunk is not None:
            on_chunk(cid)

    local_ids = [cid for cid in needed if local.has(cid)]
    remote_ids = [cid for cid in needed if not local.has(cid)]
    missing_locally: list[bytes] = []
    fetched: list[bytes] = []  # chunk ids fetched as chunks (the rest came from patches)
    has_peers = swarm is not None and bool(swarm.peers) and options.policy.asks_peers
    patching = options.patches and bool(manifest.patches)
    patching = patching and ((bool(mirrors) and options.policy.uses_cdn) or has_peers)

    async def fetch_remote() -> None:
        """Patches first (planned against what peers and the CDN can deliver; the swarm runs
        one fetch per manifest at a time), then the chunks left, with those of any patch
        that failed."""
        ids = remote_ids
        if patching and ids:
            ids = await patch_phase(
                stage, ids, local, mirrors, options, put, progress.advance, result, swarm
            )
        fetched.extend(ids)
        if ids:
            await fetch_missing(stage, ids, mirrors, options, put, progress, result, swarm)

    async def copy_local() -> None:
        def copy_one(cid: bytes) -> bool:
            data = local.read(cid)
            if data is None:
                return False
            put(cid, data)
            return True

        for cid in local_ids:
            if await trio.to_thread.run_sync(copy_one, cid):
                result.bytes_reused += unique[cid]
                progress.advance(unique[cid])
            else:
                missing_locally.append(cid)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy_local)
            nursery.start_soon(fetch_remote)
        if missing_locally:
            await fetch_missing(
                stage, missing_locally, mirrors, options, put, progress, result, swarm
            )
    except BaseExceptionGroup as group:
        raise most_telling(group) from None
    finally:
        journal.close()
        stage.close_files()
    await trio.to_thread.run_sync(stage.finish)
    progress.finish()
    got = set(fetched) | set(missing_locally)
    result.methods = {f.path: _method(f, result.patched, got) for f in manifest.files}


def _method(f: M.FileEntry, patched: set[bytes], fetched: set[bytes]) -> str:
    """How a file's bytes came, for ``--json``: from a patch, as chunks, or all local."""
    ids = {c.id for c in f.chunks}
    return "patch" if ids & patched else "chunks" if ids & fetched else "reused"
