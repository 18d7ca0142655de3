"""The launcher lock: a game that is running is not switched under it.

A launcher (or the game itself) holds a *shared* ``flock`` on the install's launch lock file
for as long as the game runs; several launchers may hold it at once. The client service
downloads an update as usual but, before the switch, takes the same lock *exclusively*: it
waits while any launcher holds it, and holds it through the switch so that no launcher starts
the game on a half-exchanged tree.

Where: ``PARENT/.NAME.p2pnode/launch.lock``, in the install's state directory (``state.py``),
not inside DEST: the switch exchanges DEST whole, and a file in it would move with the old
tree (and ``verify`` would count it as the user's). ``launch_lock_path(dest)`` names it for
launchers written in any language; :func:`launching` is the Python launcher's side.

``flock`` locks die with their process, so a crashed game never holds an update back.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .fsutil import lock_nowait
from .state import StateDir

__all__ = ["LAUNCH_LOCK", "launch_lock_path", "launching", "try_hold_for_switch"]

LAUNCH_LOCK = "launch.lock"


def launch_lock_path(dest: Path) -> Path:
    """The launch lock file of the install at ``dest`` (it need not exist yet)."""
    return StateDir(dest).root / LAUNCH_LOCK


def _open(path: Path) -> int:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def launching(dest: Path) -> Iterator[None]:
    """Hold the launch lock (shared) while the block runs the game: no switch happens
    meanwhile. Blocks while a switch holds it (a switch takes well under a second)."""
    fd = _open(launch_lock_path(dest))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def try_hold_for_switch(dest: Path) -> int | None:
    """The lock taken exclusively (its fd: close it after the switch), or None while a
    launcher holds it."""
    path = launch_lock_path(dest)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return lock_nowait(path)
