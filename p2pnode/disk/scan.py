"""Hash an install in place against its manifest: which files are missing, corrupt or extra,
and which are the user's.

Pure reading (``scan``, ``file_problem``), plus the small move repair makes on the tree:
clearing the way for a rebuilt file by displacing what is in the way beside it (never deleting
it: it may be someone's saved game; see ``userfiles``). The repair workflow that fetches what
is missing lives in :mod:`p2pnode.node.verify`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..release import manifest as M
from .stage import read_verified
from .state import StateDir
from .userfiles import displaced_name, free_name

__all__ = ["MISSING", "VerifyReport", "clear_way", "file_problem", "prune_empty_dirs", "scan"]


@dataclass
class VerifyReport:
    manifest: M.Manifest
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)  # path -> what is wrong
    extra: list[str] = field(default_factory=list)  # left over from a kept earlier build
    user_files: list[str] = field(default_factory=list)  # no kept build lists them: the user's
    displaced: dict[str, str] = field(default_factory=dict)  # in repair's way: path -> new path
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
            "user_files": self.user_files,
            "displaced": self.displaced,
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


MISSING = "missing"


def file_problem(
    dest: Path,
    f: M.FileEntry,
    deep: Callable[[os.stat_result], bool],
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[str | None, int]:
    """What is wrong with ``f``'s file in the tree ``dest`` (None: nothing; ``MISSING``), and
    how many of its chunks do not match. Chunks are hashed only if ``deep(stat)`` says so;
    ``advance`` is told every byte of ``f`` (checked or skipped) for progress."""
    path = dest / f.path
    why: str | None = None
    bad = 0
    try:
        st = path.lstat()
    except FileNotFoundError:
        why = MISSING
    except NotADirectoryError:
        why = "a parent is not a directory"
    else:
        if not stat.S_ISREG(st.st_mode) or not _inside(dest, path):
            why = "not a regular file inside the install"
        elif st.st_size != f.size:
            why = f"size {st.st_size}, expected {f.size}"
        elif deep(st):
            for c in f.chunks:
                if read_verified(path, c.offset, c.length, c.id) is None:
                    bad += 1
                advance(c.length)
            if bad:
                why = f"{bad} of {len(f.chunks)} chunks do not match"
            return (why or _mode_problem(st, f)), bad
        if why is None:
            why = _mode_problem(st, f)
    advance(f.size)
    return why, bad


def _mode_problem(st: os.stat_result, f: M.FileEntry) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    return None if mode == f.mode else f"mode {mode:o}, expected {f.mode:o}"


def scan(
    dest: Path, manifest: M.Manifest, progress: Progress, shipped_before: Set[str] = frozenset()
) -> VerifyReport:
    """Hash everything; pure reading, nothing is changed. An unlisted file is "extra" (ours,
    left over) only if a kept earlier build, ``shipped_before``, listed it; otherwise it is
    the user's (see ``userfiles``)."""
    report = VerifyReport(manifest)
    progress.start(manifest.total_size, f"verify {manifest.app} {manifest.version}")
    for f in manifest.files:
        why, bad = file_problem(dest, f, lambda st: True, progress.advance)
        if why == MISSING:
            report.missing.append(f.path)
        elif why is not None:
            report.corrupt[f.path] = why
            report.bad_chunks += bad
    wanted = {f.path for f in manifest.files}
    for root, dirs, files in os.walk(dest):
        rel_root = Path(root).relative_to(dest)
        for name in sorted(files) + sorted(d for d in dirs if (Path(root) / d).is_symlink()):
            rel = (rel_root / name).as_posix()
            if rel not in wanted:
                (report.extra if rel in shipped_before else report.user_files).append(rel)
    report.extra.sort()
    report.user_files.sort()
    progress.finish()
    return report


def clear_way(sd: StateDir, target: Path, when: str) -> dict[str, str]:
    """Move aside, within the install, whatever stops ``target`` from being a regular file
    inside it: a folder or link in its place, or a parent that is a file or a link. Such a
    thing is the user's (or holds the user's files): it is displaced under the documented
    name, never deleted. Returns what moved where (paths relative to the install)."""
    moved: dict[str, str] = {}
    rel = target.relative_to(sd.dest)
    probe = sd.dest
    for part in rel.parts:
        probe = probe / part
        last = probe == target
        in_way = probe.is_dir() if last else probe.exists() and not probe.is_dir()
        if probe.is_symlink() or in_way:
            aside = free_name(probe.with_name(displaced_name(probe.name, when)))
            os.rename(probe, aside)
            moved[probe.relative_to(sd.dest).as_posix()] = aside.relative_to(sd.dest).as_posix()
        if last:
            break
    return moved


def prune_empty_dirs(root: Path, emptied: Iterable[str], keep: set[str]) -> None:
    """Remove the folders that held ``emptied`` (paths moved out) if that left them empty and
    no file in ``keep`` lives there; any other empty folder may be the user's, and stays."""
    tried: set[str] = set()
    for rel in emptied:
        parts = rel.split("/")[:-1]
        while parts:
            sub = "/".join(parts)
            if sub in tried or sub in keep:
                break
            tried.add(sub)
            try:
                os.rmdir(root / sub)
            except OSError:
                break
            parts.pop()
