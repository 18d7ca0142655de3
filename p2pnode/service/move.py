"""Moving an installed game to another DEST, crash-safe, with every file of the user's.

What moves is the install directory (DEST: the build's files and every file the user put
there, saves, configs, mods) and its state directory beside it (``.NAME.p2pnode``: manifests,
the store of kept builds, the launcher lock), so the launcher lock follows DEST.

Two ways, chosen by whether the old and the new place share a filesystem:

* **rename**: one ``rename`` for DEST, one for its state directory. Nothing is copied, nothing
  can be lost; a kill between the two renames is finished forward at the next start.
* **copy**: every file copied (regular files, folders, symbolic links; mode and mtime kept),
  fsync'd, then checked: a file the installed build lists is hashed (blake3, chunk by chunk)
  against the manifest, and any other file (the user's, the state directory's) is compared
  byte for byte with its original; a build file that does not match its manifest (edited by
  the user, or damaged) is compared byte for byte too, so the copy is always the faithful one.
  Only then is the library switched to the new place, and only after that is the old tree
  deleted.

The journal
-----------
``STATE/moves/<entry>.json`` in the daemon's state dir records the move before it touches a
file, and its phase after each step that decides the outcome:

``transfer``: the old place is the truth. A copy is rolled back (the copies deleted; the target
was empty or missing, so nothing of anyone's is lost) and the job, queued again by the restart,
starts over. A rename is finished forward instead (each of the two names moved if it is still at
the old place): afterwards the new place is the truth.

``switched``: the copy is complete and verified; the new place is the truth. The library is
pointed at it (again, if the kill came before), the old tree is deleted, and the journal goes.

So after a kill at any point, the game is whole at the old place or at the new one, and the
library names the place where it is whole once the daemon has started again.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..disk.fsutil import fsync_dir
from ..disk.linkeddest import state_root
from ..disk.stage import read_verified
from ..disk.state import StateDir as InstallDir
from ..errors import DiskSpaceError, P2PNodeError, UsageError
from ..release import manifest as M
from .statedir import DamagedStateError, read_json, write_json

__all__ = [
    "MOVE_RESERVE",
    "MoveJournal",
    "check_space",
    "check_target",
    "choose_method",
    "finish",
    "journal_path",
    "journals",
    "recover_files",
    "transfer",
]

#: Free space left over at the target after a copy (state files, the next update's journal).
MOVE_RESERVE = 64 * 2**20
#: Bytes per read and write while copying.
BLOCK = 1 << 20

Method = Literal["rename", "copy"]


class _Stopped(Exception):
    """The job was stopped (pause, cancel) during a copy."""


@dataclass
class MoveJournal:
    """One move in progress, as saved in ``STATE/moves/<entry>.json``."""

    path: Path
    entry: str
    src: str  # the old DEST
    dst: str  # the new DEST
    method: Method
    phase: Literal["transfer", "switched"] = "transfer"
    made_dir: bool = False  # an empty target directory was removed (rolled back: made again)

    def save(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        doc = {
            "format": 1,
            "entry": self.entry,
            "src": self.src,
            "dst": self.dst,
            "method": self.method,
            "phase": self.phase,
            "made_dir": self.made_dir,
        }
        write_json(self.path, doc)
        fsync_dir(self.path.parent)

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    @classmethod
    def load(cls, path: Path) -> MoveJournal:
        doc: Any = read_json(path)
        try:
            if doc is None or doc.get("format") != 1:
                raise ValueError("unknown format")
            fields = {k: doc[k] for k in ("entry", "src", "dst", "method", "phase", "made_dir")}
            if fields["method"] not in ("rename", "copy"):
                raise ValueError(f"method {fields['method']!r}")
            if fields["phase"] not in ("transfer", "switched"):
                raise ValueError(f"phase {fields['phase']!r}")
            if not all(isinstance(fields[k], str) for k in ("entry", "src", "dst")):
                raise ValueError("entry, src and dst must be strings")
            if not all(os.path.isabs(fields[k]) for k in ("src", "dst")):
                raise ValueError("src and dst must be absolute paths")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DamagedStateError(
                f"{path} is not a move journal this daemon wrote: {exc}",
                fix=f"check where the game is (its old or new DEST), fix the library, then "
                f"delete {path}",
            ) from exc
        return cls(path, **fields)

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        """(old, new) of DEST and of its state directory."""
        src, dst = Path(self.src), Path(self.dst)
        return [(src, dst), (state_root(src), state_root(dst))]


def journal_path(moves: Path, entry: str) -> Path:
    return moves / f"{entry}.json"


def journals(moves: Path) -> list[MoveJournal]:
    """Every move a killed daemon left in progress."""
    if not moves.is_dir():
        return []
    return [MoveJournal.load(p) for p in sorted(moves.glob("*.json"))]


# Checks ----------------------------------------------------------------------------------


def _inside(a: str, b: str) -> bool:
    """``a`` is ``b`` or lies inside it (normalised absolute paths)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_target(src: str, dst: str) -> None:
    """Refuse a target the game cannot be moved to, before anything is touched.

    Raises:
        UsageError: the target is the install or inside it, contains it, is a file or a
            non-empty folder, has an install's state beside it, or the install is reached
            through a symbolic link.
    """
    if not os.path.isabs(dst):
        raise UsageError(f"--to {dst!r} is not an absolute path", fix="pass the new DEST in full")
    if os.path.normpath(dst) == os.path.dirname(os.path.normpath(dst)):
        raise UsageError(f"--to {dst} is a filesystem root", fix="pass a directory of its own")
    if _inside(dst, src):
        what = "is" if dst == src else "lies inside"
        raise UsageError(
            f"the new DEST {dst} {what} the install at {src}",
            fix="move it to a directory outside the current DEST",
        )
    if _inside(src, dst):
        raise UsageError(
            f"the new DEST {dst} contains the install at {src}",
            fix="name the new directory itself, e.g. --to " + os.path.join(dst, "GAME"),
        )
    if os.path.islink(src):
        raise UsageError(
            f"the install at {src} is reached through a symbolic link",
            fix="move the link's target yourself and point the link at the new place",
        )
    target = Path(dst)
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise UsageError(
                f"the new DEST {dst} exists and is not a directory",
                fix="pick a new or empty directory",
            )
        if any(target.iterdir()):
            raise UsageError(
                f"the new DEST {dst} exists and is not empty",
                fix="pick a new or empty directory (nothing is ever merged into or overwritten)",
            )
    if os.path.lexists(state_root(target)):
        raise UsageError(
            f"{state_root(target)} (an install's state) is already beside the new DEST",
            fix="pick another directory, or remove that state if no game uses it",
        )
    if not (Path(src).is_dir() and InstallDir(Path(src)).exists):
        raise UsageError(
            f"nothing is installed at {src} to move",
            fix="install it first, or remove the entry and add it at the new place",
        )


def choose_method(src: Path, dst: Path) -> Method:
    """``rename`` when the old and new place share a filesystem, else ``copy``."""
    same = os.stat(src.parent).st_dev == os.stat(_existing_ancestor(dst.parent)).st_dev
    return "rename" if same else "copy"


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (relative, '/'-separated), folders before their contents."""
    todo = [""]
    while todo:
        rel_dir = todo.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            st = e.stat(follow_symlinks=False)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                todo.append(rel)


def _size(root: Path) -> int:
    total = 0
    if not root.exists():
        return 0
    for rel, st in _walk(root):
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise UsageError(
                f"{root / rel} is neither a file, a folder nor a link, and cannot be moved",
                fix="remove it (or move the game yourself)",
            )
    return total


def check_space(j: MoveJournal) -> int:
    """The bytes a copy writes; refuses a target without room for them and a reserve."""
    if j.method == "rename":
        return 0  # nothing is written: no walk of a large tree
    need = sum(_size(old) for old, _ in j.pairs)
    at = _existing_ancestor(Path(j.dst).parent)
    free = shutil.disk_usage(at).free
    if need + MOVE_RESERVE > free:
        mib = -(-(need + MOVE_RESERVE) // 2**20)
        raise DiskSpaceError(
            f"moving the game needs {mib} MiB free at {at} (its files plus a "
            f"{MOVE_RESERVE // 2**20} MiB reserve), but there are {free // 2**20} MiB",
            fix="free space there, or pick another place",
        )
    return need


# Steps -----------------------------------------------------------------------------------


def transfer(
    j: MoveJournal,
    advance: Callable[[int], None],
    stopped: threading.Event,
    on_verify: Callable[[], None] = lambda: None,
) -> bool:
    """Put the game at ``j.dst`` (renamed, or copied and verified) and record it; the old tree
    stays until :func:`finish`. Blocking: run it in a thread. False: ``stopped`` was set
    during a copy, which was undone (the old place is the truth, the journal gone)."""
    dst = Path(j.dst)
    if dst.is_dir() and not dst.is_symlink():
        j.made_dir = True  # checked empty: it is made again if the move is undone
    j.save()
    if j.made_dir:
        dst.rmdir()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if j.method == "rename":
        _rename_forward(j)
        return True
    try:
        for old, new in j.pairs:
            if old.exists():
                _copy_tree(old, new, advance, stopped)
        on_verify()
        _verify(j, stopped)
    except _Stopped:
        _roll_back(j)
        return False
    except BaseException:
        _roll_back(j)
        raise
    j.phase = "switched"
    j.save()
    return True


def _rename_forward(j: MoveJournal) -> None:
    for old, new in j.pairs:
        if not os.path.lexists(old):
            continue  # renamed before the kill
        if new.is_dir() and not new.is_symlink() and not any(new.iterdir()):
            new.rmdir()  # the empty target, killed before it was removed
        os.rename(old, new)
        fsync_dir(new.parent)
        fsync_dir(old.parent)


def _roll_back(j: MoveJournal) -> None:
    """Undo a copy that did not complete: the old place is untouched and whole."""
    for _, new in j.pairs:
        shutil.rmtree(new, ignore_errors=True)
    if j.made_dir:
        Path(j.dst).mkdir(exist_ok=True)
    j.drop()


def _copy_tree(
    src: Path, dst: Path, advance: Callable[[int], None], stopped: threading.Event
) -> None:
    os.mkdir(dst, stat.S_IMODE(os.lstat(src).st_mode) | 0o700)
    folders = [("", os.lstat(src))]
    for rel, st in _walk(src):
        if stopped.is_set():
            raise _Stopped()
        s, d = src / rel, dst / rel
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(d, 0o700)
            folders.append((rel, st))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(s, d, st, advance, stopped)
        else:
            raise UsageError(
                f"{s} is neither a file, a folder nor a link, and cannot be moved",
                fix="remove it (or move the game yourself)",
            )
    for rel, st in reversed(folders):  # modes and times last: writing inside changes them
        d = dst / rel if rel else dst
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
        fsync_dir(d)
    fsync_dir(dst.parent)


def _copy_file(
    src: Path, dst: Path, st: os.stat_result, advance: Callable[[int], None], stop: threading.Event
) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(BLOCK):
            if stop.is_set():
                raise _Stopped()
            fout.write(block)
            advance(len(block))
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _verify(j: MoveJournal, stopped: threading.Event) -> None:
    """Every copied file checked (see the module text); raises on the first that differs."""
    src = Path(j.src)
    ours = _build_files(src)
    for old, new in j.pairs:
        if not old.exists():
            continue
        for rel, st in _walk(old):
            if stopped.is_set():
                raise _Stopped()
            a, b = old / rel, new / rel
            if stat.S_ISLNK(st.st_mode):
                same = os.path.islink(b) and os.readlink(a) == os.readlink(b)
            elif stat.S_ISDIR(st.st_mode):
                same = b.is_dir() and not b.is_symlink()
            else:
                entry = ours.get(rel) if old == src else None
                same = (entry is not None and _matches(b, entry)) or _same_bytes(a, b)
            if not same:
                raise P2PNodeError(
                    f"the copy of {a} at {b} differs from it; nothing was moved",
                    fix="check the disk at the new place, then move again",
                )


def _build_files(dest: Path) -> dict[str, M.FileEntry]:
    """The installed build's files by path (empty if its manifest cannot be read)."""
    sd = InstallDir(dest)
    try:
        state = sd.load()
        return {f.path: f for f in sd.load_manifest(state.current).files} if state.current else {}
    except P2PNodeError:
        return {}


def _matches(path: Path, entry: M.FileEntry) -> bool:
    """The file at ``path`` is the build's: its size, and every chunk's blake3."""
    try:
        if os.lstat(path).st_size != entry.size:
            return False
    except OSError:
        return False
    return all(read_verified(path, c.offset, c.length, c.id) is not None for c in entry.chunks)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return os.lstat(b).st_size == os.lstat(a).st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def finish(j: MoveJournal) -> None:
    """After the library names the new place: delete the old tree (copy) and the journal."""
    if j.method == "copy":
        for old, _ in j.pairs:
            if os.path.lexists(old):
                shutil.rmtree(old)
        fsync_dir(Path(j.src).parent)
    j.drop()


def recover_files(j: MoveJournal) -> bool:
    """After a kill: settle the files of an unfinished move. True: the game is at ``j.dst``
    (point the library there, then :func:`finish`); False: it is at ``j.src`` (rolled back,
    journal dropped)."""
    if j.phase == "switched":
        return True
    if j.method == "rename":
        _rename_forward(j)
        return True
    if not Path(j.src).is_dir():  # never delete the copies while the old tree is not there
        raise P2PNodeError(
            f"a move of {j.src} to {j.dst} was interrupted and {j.src} is gone",
            fix=f"check {j.dst}; the journal {j.path} is kept until you delete it",
        )
    _roll_back(j)
    return False
