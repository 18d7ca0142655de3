"""Check an install against its manifest, and repair it.

Verification hashes every chunk of every file in place and reports files that are missing,
corrupt (wrong type, size, mode or chunk hashes) and extra. Repair rebuilds each damaged file
in a private stage from verified chunks (the file's own good chunks, the same chunk elsewhere in
the install, the store, and the CDN only for what is left), then renames it over the damaged one,
so a flipped byte costs one chunk from the network, and an interrupted repair leaves every file
either as it was or whole. Extra files are moved to the state directory's quarantine, not deleted:
they may be someone's saved games.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from ..cdn.mirrors import resolve_mirrors
from ..disk.scan import VerifyReport, clear_way, prune_empty_dirs, scan
from ..disk.stage import Journal, LocalChunks, Stage
from ..disk.state import StateDir
from ..disk.store import ChunkStore
from ..disk.switch import installed
from ..progress import NullProgress, Progress
from ..release import manifest as M
from .install import InstallOptions, InstallResult, assemble

__all__ = ["VerifyReport", "verify"]


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
        report = await trio.to_thread.run_sync(scan, sd.dest, manifest, progress)
        if repair and not report.ok:
            await _repair(sd, manifest, report, options, progress, state.mirrors)
        report.seconds = time.monotonic() - t0
        return report


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
        for f in files:
            target = sd.dest / f.path
            clear_way(sd, target)
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
        prune_empty_dirs(sd.dest, {str(Path(f.path).parent) for f in manifest.files})
    report.missing.clear()
    report.corrupt.clear()
    report.extra.clear()
