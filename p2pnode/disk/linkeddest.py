"""An install directory named through a symbolic link (a games folder on another disk).

A switch exchanges two *directories* by name (``renameat2`` in the parent, see switch.py), so
it must work beside the real directory, on its filesystem. The link is therefore resolved once,
when the install is opened: the install is the link's target, its state directory sits beside
the target (``TARGET_PARENT/.TARGET_NAME.p2pnode``), and the link itself is never renamed,
replaced or followed again. A link that cannot be installed through (dangling, to a file, a
loop, to the top of a filesystem) is refused before anything is fetched.

Two leftovers of versions that did not resolve the link are handled here:

* the state kept beside the *link* (``LINK_PARENT/.LINK_NAME.p2pnode``): moved beside the
  target by one rename when both are on one filesystem; across filesystems the move is left
  to the user (a store can be gigabytes; copying it here would not be crash-safe), and named.
* the link itself, which an earlier switch exchanged away and parked as ``old`` in the state
  directory (the install directory became a real one): it is moved to ``replaced-link`` in
  the state directory so that switches work again; the install stays where it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import InstallError, InstallLockedError

__all__ = ["REPLACED_LINK", "adopt_state_beside_link", "resolve", "state_root", "unpark_link"]

REPLACED_LINK = "replaced-link"


def state_root(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.p2pnode"


def resolve(dest: Path) -> tuple[Path, Path | None]:
    """The real install directory named by ``dest`` (absolute), and the link it was named
    through (``None`` if ``dest`` is not a link). Refuses links that cannot be installed
    through, saying why and what to do."""
    if not dest.is_symlink():
        return dest, None
    try:
        real = Path(os.path.realpath(dest, strict=True))
    except OSError as exc:
        points_to = os.readlink(dest)
        if exc.errno == errno.ELOOP:
            raise InstallError(
                f"{dest} is a symbolic link that loops back on itself (to {points_to})",
                fix=f"point {dest} at the directory to install into",
            ) from exc
        raise InstallError(
            f"{dest} is a symbolic link to {points_to}, which does not exist",
            fix="create that directory (or mount the disk it is on), or point the link at "
            "an existing directory",
        ) from exc
    if not real.is_dir():
        raise InstallError(
            f"{dest} is a symbolic link to {real}, which is not a directory",
            fix=f"point {dest} at a directory, or install somewhere else",
        )
    if real.parent == real or os.path.ismount(real):
        raise InstallError(
            f"{dest} is a symbolic link to {real}, the top of a filesystem; p2pnode keeps its "
            "state beside the install directory and swaps trees there, on the same filesystem",
            fix=f"point {dest} at a folder inside {real}",
        )
    return real, dest


def adopt_state_beside_link(link: Path, root: Path) -> None:
    """Move the state an earlier version kept beside ``link`` to ``root`` (beside the target),
    under that state's lock, if there is such a state and none at ``root`` yet."""
    legacy = state_root(link)
    if legacy == root or not legacy.is_dir() or root.exists():
        return
    try:
        fd = os.open(legacy / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return  # another process moved it meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InstallLockedError(f"another p2pnode process is working on {link}") from exc
        if not legacy.is_dir() or root.exists():
            return
        try:
            os.rename(legacy, root)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            raise InstallError(
                f"the state of the install at {link} is kept beside the link, in {legacy}, "
                f"on another filesystem than the install itself ({link.resolve()})",
                fix=f"move it beside the install: mv {legacy} {root}",
            ) from exc
    finally:
        os.close(fd)


def unpark_link(old: Path, root: Path) -> None:
    """If ``old`` is a link an earlier switch exchanged away from the install's place, move it
    out of the way (to ``root/replaced-link``) so that the old tree can be parked there."""
    if not old.is_symlink():
        return
    os.replace(old, root / REPLACED_LINK)
