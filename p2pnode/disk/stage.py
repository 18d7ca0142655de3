"""Assembling a version's files beside the install, with a resume journal.

Theory of operation
-------------------
The next version is built in ``stage/``: every file is created at its final size, and each
chunk, once verified, is written at every offset where the manifest places it. After the
write, the chunk id is appended to ``stage.journal``. A process killed at any moment therefore
leaves a journal that names only chunks whose bytes were handed to the kernel, and the next run
skips them. Only a crash of the whole machine can lose written bytes that the journal already
names: the journal's header carries the kernel's boot id, and after a reboot the journaled
chunks are re-hashed (cheap at blake3 speed) instead of trusted.

``LocalChunks`` finds chunks already on this machine (the installed version's files, the chunk
store, the stage itself) so that updates fetch only what is new. Every local read is verified:
a user may have edited an installed file.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from ..errors import InstallError
from ..release import manifest as M
from ..release.chunker import hash_chunk
from ..release.delta import pieces
from .fsutil import fsync_path, start_writeback
from .store import ChunkStore

__all__ = ["Journal", "LocalChunks", "Stage"]

_MAGIC = b"P2PJ1\n"
_HEADER = len(_MAGIC) + 32 + 36
#: Files kept open while staging: enough that a release's files are not reopened per chunk,
#: few enough to stay far below any descriptor limit.
MAX_OPEN_FILES = 64
_OPEN_FLAGS = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _boot_id() -> bytes:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_bytes()[:36].ljust(36, b" ")
    except OSError:
        return b"?" * 36


class Journal:
    """Append-only list of verified chunk ids for one target manifest."""

    def __init__(self, path: Path, manifest_id: bytes) -> None:
        self.path = path
        self.manifest_id = manifest_id
        self.done: set[bytes] = set()
        self.rebooted = False
        self._fd: int | None = None

    def open(self) -> None:
        header = _MAGIC + self.manifest_id + _boot_id()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        if data[: len(_MAGIC) + 32] == header[: len(_MAGIC) + 32]:
            self.rebooted = data[len(_MAGIC) + 32 : _HEADER] != header[len(_MAGIC) + 32 :]
            body = data[_HEADER:]
            body = body[: len(body) - len(body) % 32]  # a torn last record is ignored
            self.done = {body[i : i + 32] for i in range(0, len(body), 32)}
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if self.rebooted:  # rewrite the header so the next run knows we re-checked
                self._rewrite(header)
        else:
            self.done = set()
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            os.write(self._fd, header)

    def _rewrite(self, header: bytes) -> None:
        assert self._fd is not None
        os.close(self._fd)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(header + b"".join(sorted(self.done)))
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    @staticmethod
    def target_of(path: Path) -> bytes | None:
        """The manifest id a journal file is for, without opening it for writing."""
        try:
            with open(path, "rb") as f:
                head = f.read(len(_MAGIC) + 32)
        except FileNotFoundError:
            return None
        if len(head) != len(_MAGIC) + 32 or not head.startswith(_MAGIC):
            return None
        return head[len(_MAGIC) :]

    @staticmethod
    def read_done(path: Path) -> set[bytes]:
        """The chunk ids a journal names, read-only (for serving from an unfinished stage)."""
        try:
            body = path.read_bytes()[_HEADER:]
        except FileNotFoundError:
            return set()
        body = body[: len(body) - len(body) % 32]
        return {body[i : i + 32] for i in range(0, len(body), 32)}

    def forget(self, ids: Iterable[bytes]) -> None:
        self.done.difference_update(ids)
        self._rewrite(_MAGIC + self.manifest_id + _boot_id())

    def record(self, chunk_id: bytes) -> None:
        assert self._fd is not None
        os.write(self._fd, chunk_id)
        self.done.add(chunk_id)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Stage:
    """The directory where ``manifest``'s files (or a subset of them) are assembled."""

    def __init__(self, root: Path, manifest: M.Manifest, files: Iterable[M.FileEntry]) -> None:
        self.root = root
        self.manifest = manifest
        self.files = list(files)
        self.locations: dict[bytes, list[tuple[str, int, int]]] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()  # open files, least recent first
        self._users: dict[int, int] = {}  # fd -> writers using it right now
        self._lock = threading.Lock()
        for f in self.files:
            for c in f.chunks:
                self.locations.setdefault(c.id, []).append((f.path, c.offset, c.length))

    def prepare(self) -> set[bytes]:
        """Create directories and size every file; existing files (a resume) are kept.

        Returns the ids of chunks that sit in files that had to be created or resized, whose
        journal entries (if any) can no longer be trusted.
        """
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        lost: set[bytes] = set()
        for f in self.files:
            target = self.root / f.path
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | _OPEN_FLAGS, 0o600)
            try:
                if os.fstat(fd).st_size != f.size or os.fstat(fd).st_blocks == 0:
                    os.ftruncate(fd, f.size)
                    lost.update(c.id for c in f.chunks)
            finally:
                os.close(fd)
        return lost

    def write_chunk(self, chunk_id: bytes, data: bytes | bytearray | memoryview) -> int:
        """Write verified bytes at every place the chunk occurs; returns bytes written.

        Thread-safe: several writer threads share the cache of open files.
        """
        written = 0
        for path, offset, length in self.locations[chunk_id]:
            if length != len(data):
                raise InstallError(f"chunk {chunk_id.hex()[:16]} has the wrong length")
            fd = self._acquire(path)
            try:
                view = memoryview(data)
                pos = offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view = view[n:]
                    pos += n
                start_writeback(fd, offset, length)
            finally:
                self._release(fd)
            written += length
        return written

    def _acquire(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(self.root / path, os.O_WRONLY | _OPEN_FLAGS)
                self._fds[path] = fd
            else:
                self._fds.move_to_end(path)
            self._users[fd] = self._users.get(fd, 0) + 1
            if len(self._fds) > MAX_OPEN_FILES:
                for old_path, old_fd in list(self._fds.items()):
                    if len(self._fds) <= MAX_OPEN_FILES:
                        break
                    if not self._users.get(old_fd):
                        del self._fds[old_path]
                        os.close(old_fd)
            return fd

    def _release(self, fd: int) -> None:
        with self._lock:
            self._users[fd] -= 1
            if not self._users[fd]:
                del self._users[fd]

    def close_files(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._users.clear()

    def recheck(self, ids: Iterable[bytes]) -> list[bytes]:
        """Chunks among ``ids`` whose bytes in the stage do not verify (after a reboot)."""
        bad = []
        for cid in ids:
            path, offset, length = self.locations[cid][0]
            if read_verified(self.root / path, offset, length, cid) is None:
                bad.append(cid)
        return bad

    def finish(self) -> None:
        """Set final modes and make every byte and name durable before the switch."""
        self.close_files()
        for f in self.files:
            target = self.root / f.path
            fd = os.open(target, os.O_RDONLY | _OPEN_FLAGS)
            try:
                os.fchmod(fd, f.mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs = {self.root} | {(self.root / f.path).parent for f in self.files}
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            os.chmod(d, 0o755)
            fsync_path(d)

    def remove(self) -> None:
        self.close_files()
        shutil.rmtree(self.root, ignore_errors=True)


def read_verified(path: Path, offset: int, length: int, chunk_id: bytes) -> bytes | None:
    """The chunk's bytes from ``path`` if they are there and hash right, else None.

    Never follows a symlink at the last component: an install directory is not trusted to be
    as we left it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return None
    try:
        data = os.pread(fd, length, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != length or hash_chunk(data) != chunk_id:
        return None
    return data


class LocalChunks:
    """Where chunks can be found on this machine, and verified reads of them.

    The installer uses it to reuse chunks; the swarm will use the same index to serve peers
    (every read is verified, so a chunk edited on disk is never served) and to tell them what
    this node holds for any manifest, including other builds of the app (``availability``).
    """

    def __init__(self, store: ChunkStore | None = None) -> None:
        self.store = store
        self.places: dict[bytes, list[tuple[Path, int, int]]] = {}

    def add_tree(self, root: Path, manifest: M.Manifest) -> None:
        for f, c in manifest.iter_chunks():
            self.places.setdefault(c.id, []).append((root / f.path, c.offset, c.length))

    def add(self, chunk_id: bytes, path: Path, offset: int, length: int) -> None:
        """One more place (a chunk that just landed in a stage)."""
        self.places.setdefault(chunk_id, []).append((path, offset, length))

    def add_stage(self, stage: Stage, done: Iterable[bytes]) -> None:
        """The chunks of an unfinished install that its journal names as written."""
        for cid in done:
            for path, offset, length in stage.locations.get(cid, ()):
                self.add(cid, stage.root / path, offset, length)

    def availability(self, manifest: M.Manifest) -> bytes:
        """A bitfield over ``manifest``'s unique chunks in first-seen order, then its patches
        (``delta.pieces``; bit 7 of byte 0 is piece 0): which of them this node can serve.
        Trusts the index, not the bytes; a read still verifies."""
        ids = list(pieces(manifest))
        bits = bytearray((len(ids) + 7) // 8)
        for i, cid in enumerate(ids):
            if self.has(cid):
                bits[i >> 3] |= 0x80 >> (i & 7)
        return bytes(bits)

    def has(self, chunk_id: bytes) -> bool:
        return chunk_id in self.places or (self.store is not None and chunk_id in self.store)

    def read(self, chunk_id: bytes) -> bytes | None:
        for path, offset, length in self.places.get(chunk_id, ()):
            data = read_verified(path, offset, length, chunk_id)
            if data is not None:
                return data
        if self.store is not None:
            return self.store.get(chunk_id)
        return None
