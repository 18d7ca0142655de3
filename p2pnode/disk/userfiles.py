"""What in an install directory belongs to the user, and carrying it across a switch.

Games keep saves, configs, mods and logs in their own folder, so an install directory holds
more than a release. The rule (``docs/user-files.md``):

* A path is **ours** when the manifest of the build in the tree lists it as a file. Everything
  else under the install directory (files, links, folders, wherever they sit) is **the
  user's**: never deleted, never overwritten, never quarantined.
* A switch (update, rollback, reinstall) builds the new tree beside the old one and exchanges
  them; then :func:`carry` moves every user entry of the old tree into the new one by rename
  (same filesystem: no copy, content, mode and mtime untouched). A folder that holds nothing
  of ours or of the new build's moves as one entry.
* A user entry in the way of the new build (the new build ships a file at its path, or at a
  parent of it, or a folder where the user has a file) is **displaced**: it moves to
  ``NAME.user-<UTC stamp>`` beside the path (for a parent in the way, the user's part of the
  tree goes under ``PARENT.user-<stamp>/``), and the switch reports it.
* A file the old build shipped and the new one does not is ours: it stays in the old tree,
  which is deleted once its chunks are harvested.
* A user entry the *new* build's manifest names in ``nokeep`` (a cache or log that build
  invalidates) is **not kept**: it moves to ``quarantine/not-kept-<stamp>/`` in the state
  directory instead of the new tree (a pattern may be wrong, so never deleted), and the switch
  reports it. A folder that only *holds* such paths is looked into rather than moved whole.

``carry`` takes what is left in the old tree as its only record: each entry moves with one
atomic rename, so after a kill the entries still in the old tree are exactly those left to
carry, and running it again finishes the job (``switch.recover`` does, before the old tree may
be deleted).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..release import manifest as M
from .fsutil import fsync_dir

__all__ = ["Carried", "carry", "dirs_of", "displaced_name", "free_name", "stamp", "user_entries"]

DISPLACED_INFIX = ".user-"


@dataclass
class Carried:
    """What a carry moved: how many user files, and which were displaced (path -> new path)."""

    kept: int = 0
    displaced: dict[str, str] = field(default_factory=dict)
    not_kept: list[str] = field(default_factory=list)  # moved to the quarantine (nokeep)

    def as_json(self) -> dict[str, Any]:
        return {
            "kept_user_files": self.kept,
            "displaced": self.displaced,
            "not_kept": self.not_kept,
        }


def stamp(now: float | None = None) -> str:
    """The UTC time in displaced names: sortable, and free of characters paths refuse."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def displaced_name(path: str, when: str) -> str:
    return f"{path}{DISPLACED_INFIX}{when}"


def dirs_of(paths: Iterable[str]) -> set[str]:
    """Every folder that holds one of ``paths`` (relative, '/'-separated)."""
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")
        for k in range(1, len(parts)):
            out.add("/".join(parts[:k]))
    return out


def user_entries(
    root: Path,
    ours: set[str],
    descend: set[str],
    look_inside: Callable[[str], bool] = lambda rel: False,
) -> Iterator[str]:
    """The user's entries under ``root``, outermost first: every non-folder not in ``ours``,
    and every folder not in ``descend`` (folders that hold nothing of ours) as one entry,
    unless ``look_inside(folder)``: then its own entries instead."""
    todo = [""]
    while todo:
        rel_dir = todo.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                if rel in descend or look_inside(rel):
                    todo.append(rel)
                else:
                    yield rel
            elif rel not in ours:
                yield rel


def _destination(rel: str, files: set[str], dirs: set[str], when: str) -> tuple[str, bool]:
    """Where a user entry goes in the new tree, and whether it had to be displaced."""
    parts = rel.split("/")
    for k in range(1, len(parts) + 1):
        prefix = "/".join(parts[:k])
        if prefix in files or (k == len(parts) and prefix in dirs):
            return "/".join([displaced_name(prefix, when), *parts[k:]]), True
    return rel, False


def free_name(path: Path) -> Path:
    """``path``, or the first of ``path.2``, ``path.3``... that names nothing yet."""
    if not os.path.lexists(path):
        return path
    n = 2
    while os.path.lexists(path.with_name(f"{path.name}.{n}")):
        n += 1
    return path.with_name(f"{path.name}.{n}")


def _count(path: Path) -> int:
    """User files in an entry: 1 for a file or link, the files and links inside a folder."""
    if not stat.S_ISDIR(path.lstat().st_mode):
        return 1
    n = 0
    for root, dirs, files in os.walk(path):
        n += len(files) + sum(1 for d in dirs if os.path.islink(os.path.join(root, d)))
    return n


def _make_parents(old: Path, new: Path, rel: str) -> set[Path]:
    """Create the folders above ``new/rel`` that the new build lacks, with the old tree's
    modes; returns the folders whose listings changed."""
    changed: set[Path] = set()
    parts = rel.split("/")[:-1]
    for k in range(1, len(parts) + 1):
        sub = "/".join(parts[:k])
        target = new / sub
        if target.is_dir() and not target.is_symlink():
            continue
        try:
            mode = stat.S_IMODE((old / sub).lstat().st_mode)
        except OSError:
            mode = 0o755
        target.mkdir(mode=mode)
        os.chmod(target, mode)  # mkdir's mode is masked by the umask
        changed.add(target.parent)
    return changed


def _make_dirs(path: Path) -> set[Path]:
    """``mkdir -p``; returns the folders whose listings changed (to fsync)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir()
    return {d.parent for d in missing}


def carry(
    old: Path,
    new: Path,
    shipped_old: M.Manifest | None,
    target: M.Manifest,
    when: str,
    quarantine: Path | None = None,
) -> Carried:
    """Move the user's entries of the tree ``old`` (where ``shipped_old``'s files are ours)
    into the tree ``new`` (which holds ``target``'s files), or those ``target.nokeep`` names
    into ``quarantine/not-kept-<when>``. Idempotent; see the module text."""
    done = Carried()
    if not old.is_dir():
        return done
    ours = {f.path for f in shipped_old.files} if shipped_old is not None else set()
    files = {f.path for f in target.files}
    dirs = dirs_of(files)
    nokeep = target.nokeep if quarantine is not None else ()
    changed: set[Path] = set()

    def look_inside(rel: str) -> bool:
        return M.could_hold_nokeep(rel, nokeep) and not M.matches_nokeep(rel, nokeep)

    for rel in list(user_entries(old, ours, dirs_of(ours) | dirs, look_inside)):
        src = old / rel
        if nokeep and M.matches_nokeep(rel, nokeep):
            assert quarantine is not None
            dst = free_name(quarantine / f"not-kept-{when}" / rel)
            changed |= _make_dirs(dst.parent)
            os.rename(src, dst)  # same filesystem as the state directory: one atomic rename
            changed |= {src.parent, dst.parent}
            done.not_kept.append(rel)
            continue
        dst_rel, displaced = _destination(rel, files, dirs, when)
        changed |= _make_parents(old, new, dst_rel)
        dst = new / dst_rel
        if os.path.lexists(dst):  # only a stranger's name collides: never overwrite it
            dst = free_name(dst)
            displaced = True
        done.kept += _count(src)
        os.rename(src, dst)
        changed |= {src.parent, dst.parent}
        if displaced:
            done.displaced[rel] = dst.relative_to(new).as_posix()
    for d in changed:
        fsync_dir(d)  # durable before anything may delete the old tree
    return done
