"""Hash an install in place against its manifest: which files are missing, corrupt or extra.

Pure reading (``scan``), plus the small moves repair makes on the tree: clearing the way for a
rebuilt file and quarantining what is in the way (never deleting it: it may be someone's saved
game). The repair workflow that fetches what is missing lives in :mod:`p2pnode.node.verify`.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..release import manifest as M
from .stage import read_verified
from .state import StateDir

__all__ = ["VerifyReport", "clear_way", "prune_empty_dirs", "quarantine", "scan"]


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


def clear_way(sd: StateDir, target: Path) -> None:
    """Move aside whatever stops ``target`` from being a regular file inside the install:
    a directory or symlink in its place, or a parent that is a file or a symlink."""
    rel = target.relative_to(sd.dest)
    probe = sd.dest
    for part in rel.parts:
        probe = probe / part
        if probe == target:
            if probe.is_symlink() or probe.is_dir():
                quarantine(sd, probe)
            return
        if probe.is_symlink() or (probe.exists() and not probe.is_dir()):
            quarantine(sd, probe)


def quarantine(sd: StateDir, path: Path) -> None:
    dst = sd.quarantine / time.strftime("%Y%m%dT%H%M%S") / path.relative_to(sd.dest)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, dst)


def prune_empty_dirs(root: Path, keep: set[str]) -> None:
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        rel = Path(dirpath).relative_to(root).as_posix()
        if rel != "." and rel not in keep and not any(k.startswith(rel + "/") for k in keep):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
