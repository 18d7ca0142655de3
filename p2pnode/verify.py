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
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import manifest as M
from .install import (
    InstallOptions,
    InstallResult,
    assemble,
    installed,
    resolve_mirrors,
)
from .progress import NullProgress, Progress
from .stage import Journal, LocalChunks, Stage, read_verified
from .state import StateDir
from .store import ChunkStore

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    manifest: M.Manifest
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)  # path -> what is wrong
    extra: list[str] = field(default_factory=list)
    bad_chunks: int = 0
    repaired: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    bytes_cdn: int = 0
    bytes_reused: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.extra)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "app": self.manifest.app,
            "version": self.manifest.version,
            "build": self.manifest.build,
            "manifest_id": self.manifest.id.hex(),
            "missing": self.missing,
            "corrupt": self.corrupt,
            "extra": self.extra,
            "bad_chunks": self.bad_chunks,
            "repaired": self.repaired,
            "quarantined": self.quarantined,
            "bytes_cdn": self.bytes_cdn,
            "bytes_reused": self.bytes_reused,
            "seconds": round(self.seconds, 3),
        }


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root + os.sep)


def scan(dest: Path, manifest: M.Manifest, progress: Progress) -> VerifyReport:
    """Hash everything; pure reading, nothing is changed."""
    report = VerifyReport(manifest)
    progress.start(manifest.total_size, f"verify {manifest.app} {manifest.version}")
    for f in manifest.files:
        path = dest / f.path
        try:
            st = path.lstat()
        except FileNotFoundError:
            report.missing.append(f.path)
            progress.advance(f.size)
            continue
        except NotADirectoryError:
            report.corrupt[f.path] = "a parent is not a directory"
            progress.advance(f.size)
            continue
        if not stat.S_ISREG(st.st_mode) or not _inside(dest, path):
            report.corrupt[f.path] = "not a regular file inside the install"
            progress.advance(f.size)
            continue
        if st.st_size != f.size:
            report.corrupt[f.path] = f"size {st.st_size}, expected {f.size}"
            progress.advance(f.size)
            continue
        bad = 0
        for c in f.chunks:
            if read_verified(path, c.offset, c.length, c.id) is None:
                bad += 1
            progress.advance(c.length)
        if bad:
            report.bad_chunks += bad
            report.corrupt[f.path] = f"{bad} of {len(f.chunks)} chunks do not match"
        elif stat.S_IMODE(st.st_mode) != f.mode:
            report.corrupt[f.path] = f"mode {stat.S_IMODE(st.st_mode):o}, expected {f.mode:o}"
    wanted = {f.path for f in manifest.files}
    for root, dirs, files in os.walk(dest):
        rel_root = Path(root).relative_to(dest)
        for name in sorted(files) + sorted(d for d in dirs if (Path(root) / d).is_symlink()):
            rel = (rel_root / name).as_posix()
            if rel not in wanted:
                report.extra.append(rel)
    report.extra.sort()
    progress.finish()
    return report


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
        from .state import InstallState

        mirrors = resolve_mirrors(
            options.mirrors, None, manifest, InstallState(mirrors=list(known_mirrors))
        )
        await assemble(stage, journal, local, mirrors, options, progress, result, sd.root)
        report.bytes_cdn = result.bytes_cdn
        report.bytes_reused = result.bytes_reused
        for f in files:
            target = sd.dest / f.path
            _clear_way(sd, target)
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
        _prune_empty_dirs(sd.dest, {str(Path(f.path).parent) for f in manifest.files})
    report.missing.clear()
    report.corrupt.clear()
    report.extra.clear()


def _clear_way(sd: StateDir, target: Path) -> None:
    """Move aside whatever stops ``target`` from being a regular file inside the install:
    a directory or symlink in its place, or a parent that is a file or a symlink."""
    rel = target.relative_to(sd.dest)
    probe = sd.dest
    for part in rel.parts:
        probe = probe / part
        if probe == target:
            if probe.is_symlink() or probe.is_dir():
                _quarantine(sd, probe)
            return
        if probe.is_symlink() or (probe.exists() and not probe.is_dir()):
            _quarantine(sd, probe)


def _quarantine(sd: StateDir, path: Path) -> None:
    dst = sd.quarantine / time.strftime("%Y%m%dT%H%M%S") / path.relative_to(sd.dest)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, dst)


def _prune_empty_dirs(root: Path, keep: set[str]) -> None:
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        rel = Path(dirpath).relative_to(root).as_posix()
        if rel != "." and rel not in keep and not any(k.startswith(rel + "/") for k in keep):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
