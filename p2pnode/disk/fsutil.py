"""Small filesystem primitives the installer's crash-safety rests on.

``exchange`` swaps two directories in one step with Linux ``renameat2(RENAME_EXCHANGE)``, so an
install directory is always a complete tree: the old one or the new one. Where the call is not
available (old kernels, some filesystems, other systems) it falls back to two renames, and the
installer's recovery (which records the new tree's inode before switching) repairs the window
between them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from pathlib import Path
from typing import Any, Self

__all__ = [
    "LockedDir",
    "exchange",
    "fsync_dir",
    "fsync_path",
    "lock_nowait",
    "rename_noreplace_or_exchange",
    "start_writeback",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

_renameat2: Any
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
    _renameat2 = None

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any
try:
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (NameError, AttributeError):  # pragma: no cover - non-Linux systems
    _sync_file_range = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it.

    With gigabytes of RAM, the kernel's background writeback starts only once ~10% of memory
    is dirty, so a whole release would still be in the page cache when the install fsyncs
    before its switch, and the install would wait for all of it there. Starting writeback as
    chunks land overlaps the disk with the download; the final fsync only waits for the tail.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``. Returns False if the system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def rename_noreplace_or_exchange(new: Path, dest: Path, old_parking: Path) -> None:
    """Put the tree ``new`` at ``dest``; the tree previously at ``dest`` ends at ``old_parking``."""
    if not dest.exists():
        os.rename(new, dest)
        return
    if exchange(new, dest):
        os.rename(new, old_parking)  # ``new`` now names the old tree
        return
    os.rename(dest, old_parking)
    os.rename(new, dest)


def fsync_path(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fsync_path(path)


def lock_nowait(path: Path) -> int | None:
    """Open (or make, mode 0600) ``path`` and take an exclusive ``flock`` on it without waiting.

    Returns the open fd, which holds the lock until it is closed (or the process dies: the
    kernel drops it, so a killed owner never leaves a stale lock); None if another open file
    holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class LockedDir:
    """Something one process at a time may work on (an install's state, a daemon's state dir):
    ``with obj:`` holds an exclusive ``flock`` (see :func:`lock_nowait`), leaving releases it.
    Subclasses define :meth:`lock`: where the lock file is and which error names the holder;
    they take it with :meth:`_take_lock`."""

    _lock_fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> None:
        raise NotImplementedError

    def _take_lock(self, path: Path) -> bool:
        """Hold the lock on ``path``; False if another open file holds it."""
        fd = lock_nowait(path)
        if fd is None:
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
