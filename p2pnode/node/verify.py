"""Check an install against its manifest, and repair it.

Verification hashes every chunk of every file in place and reports files that are missing,
corrupt (wrong type, size, mode or chunk hashes), extra (left over from a kept earlier build)
and the user's (no kept build lists them; ``disk/userfiles.py``). Repair rebuilds each damaged
file in a private stage from verified chunks (the file's own good chunks, the same chunk
elsewhere in the install, the store, and the CDN only for what is left), then renames it over
the damaged one, so a flipped byte costs one chunk from the network, and an interrupted repair
leaves every file either as it was or whole. Extra files are moved to the state directory's
quarantine, not deleted. The user's files are never touched; one in the way of a rebuilt file
(a folder or link at its path) is displaced beside it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from ..cdn.mirrors import resolve_mirrors
from ..disk import snapshot
from ..disk.scan import VerifyReport, clear_way, prune_empty_dirs, scan
from ..disk.stage import Journal, LocalChunks, Stage
from ..disk.state import InstallState, StateDir
from ..disk.store import ChunkStore
from ..disk.switch import installed
from ..disk.userfiles import dirs_of, stamp
from ..progress import NullProgress, Progress
from ..release import manifest as M
from .install import InstallOptions, InstallResult, assemble

__all__ = ["VerifyReport", "heal", "repaired", "verify"]


async def verify(
    dest: Path,
    *,
    repair: bool = False,
    options: InstallOptions | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    options = options or InstallOptions()
    progress = progress or NullProgress()
    t0 = time.monotonic()
    async with installed(dest) as (sd, state, manifest):
        shipped: set[str] = set()
        for mid in state.history:
            shipped.update(f.path for f in sd.load_manifest(mid).files)
        report = await trio.to_thread.run_sync(scan, sd.dest, manifest, progress, shipped)
        if repair and not report.ok:
            await _repair(sd, manifest, report, options, progress, state.mirrors)
        report.seconds = time.monotonic() - t0
        return report


async def heal(
    sd: StateDir,
    state: InstallState,
    manifest: M.Manifest,
    options: InstallOptions,
    progress: Progress,
) -> InstallResult:
    """Repair what the cheap check (``disk/snapshot.py``) finds missing or damaged, as
    ``verify --repair`` would: for an install asked again of a build the state says is there."""
    health = await trio.to_thread.run_sync(snapshot.check, sd, manifest)
    report = VerifyReport(manifest, missing=health.missing, corrupt=health.damaged)
    damaged = list(report.missing) + list(report.corrupt)
    await _repair(sd, manifest, report, options, progress, state.mirrors)
    result = repaired(report)
    result.repaired = damaged
    return result


def repaired(report: VerifyReport) -> InstallResult:
    """A repair as an install's result (action ``repaired``, the same build before and after):
    how ``heal`` answers, and what ``verify --repair --tracker`` reports as an outcome."""
    m = report.manifest
    result = InstallResult("repaired", m, m.build, m.total_size)
    result.bytes_cdn, result.bytes_reused = report.bytes_cdn, report.bytes_reused
    result.repaired, result.displaced = list(report.repaired), report.displaced
    result.seconds = report.seconds
    return result


async def _repair(
    sd: StateDir,
    manifest: M.Manifest,
    report: VerifyReport,
    options: InstallOptions,
    progress: Progress,
    known_mirrors: Sequence[str],
) -> None:
    damaged = set(report.missing) | set(report.corrupt)
    files = [f for f in manifest.files if f.path in damaged]
    stage_root = sd.root / "repair"
    journal_path = sd.root / "repair.journal"
    shutil.rmtree(stage_root, ignore_errors=True)
    journal_path.unlink(missing_ok=True)
    if files:
        stage = Stage(stage_root, manifest, files)
        journal = Journal(journal_path, manifest.id)
        journal.open()
        local = LocalChunks(ChunkStore(sd.store_dir))
        local.add_tree(sd.dest, manifest)
        result = InstallResult("repair", manifest, manifest.build, 0)
        mirrors = resolve_mirrors(options.mirrors, None, manifest, known_mirrors)
        await assemble(stage, journal, local, mirrors, options, progress, result, sd.root)
        report.bytes_cdn = result.bytes_cdn
        report.bytes_reused = result.bytes_reused
        when = stamp()
        for f in files:
            target = sd.dest / f.path
            report.displaced.update(clear_way(sd, target, when))
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.replace(stage_root / f.path, target)
            report.repaired.append(f.path)
        shutil.rmtree(stage_root, ignore_errors=True)
        journal_path.unlink(missing_ok=True)
    if report.extra:
        bin_ = sd.quarantine / time.strftime("%Y%m%dT%H%M%S")
        for rel in report.extra:
            src = sd.dest / rel
            dst = bin_ / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            report.quarantined.append(rel)
        prune_empty_dirs(sd.dest, report.quarantined, dirs_of(f.path for f in manifest.files))
    await trio.to_thread.run_sync(snapshot.record, sd, manifest)
    report.missing.clear()
    report.corrupt.clear()
    report.extra.clear()
