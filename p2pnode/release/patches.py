"""Generating a release's patches from the builds published before it (the Delta Generator).

For every earlier build kept in the output directory (the last two by default), each file of
the new release is compared with that build by chunk id. A run of chunks the earlier build
does not have is what a node holding that build would fetch; the run is cut into bounded
segments, and each segment is compressed against the stretch of the earlier file it most
likely came from (located through the nearest chunks both builds share, else by proportion).
A patch is kept only when it is clearly smaller than the chunks it replaces.

The base stretch is found in the earlier file of the same path or, for a renamed file, the
earlier file sharing most chunks with it. Base bytes are re-hashed as they are read, so a
damaged output directory yields no patch rather than one nodes cannot apply.

Patches are appended to one pack per release (``layout.patch_pack_path``) and described in
the manifest (``patchmeta``); a node fetches them by range, like chunks.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from ..errors import P2PNodeError
from . import layout
from . import manifest as M
from .chunker import hash_chunk
from .delta import DEFAULT_LEVEL, make_patch, patch_memory
from .patchmeta import MAX_PATCH_BASE_BYTES, MAX_PATCH_BYTES, MAX_PATCH_RESULT_BYTES, Patch

__all__ = [
    "DEFAULT_FROM_BUILDS",
    "MAX_WORKERS",
    "PatchStats",
    "default_workers",
    "earlier_builds",
    "generate",
]

DEFAULT_FROM_BUILDS = 2
#: Keep a patch only if it is at most this fraction of the chunk bytes it replaces: a patch
#: barely smaller than its chunks is not worth its manifest entry and the CPU to apply it.
KEEP_RATIO = 0.8
#: Base bytes read on each side of the stretch a segment maps to, when the segment could only
#: be placed by proportion (no chunk both builds share nearby): edits shift data, and zstd
#: finds it anywhere in the dictionary.
MIN_MARGIN = 2 * 1024 * 1024
#: The same when shared chunks pin the segment on both sides: the old bytes are between them,
#: so a little context is enough, and a small base is what keeps applying fast (loading the
#: dictionary costs as much as decoding).
ANCHORED_MARGIN = 256 * 1024
#: The fast level each segment is tried at first, and how much of the result its patch may
#: be for the slow level to be tried: level 19 gains about a sixth over it (687 KB at level
#: 3, 567 KB at 19 on a rebuilt 5.5 MB .so), so above this it could not get under
#: KEEP_RATIO.
PROBE_LEVEL = 3
PROBE_RATIO = 0.95
#: How far (in chunks) to look for a chunk both builds share, to align a segment.
ANCHOR_SEARCH = 64
#: Segments patched at once at most (threads), whatever the cores; the memory budget below
#: may allow fewer.
MAX_WORKERS = 4
#: What the segments being patched at once may hold together (``_Job.memory``): the
#: publisher stays below 2 GiB with its own ~0.3 GB (measured on a 4 GiB release).
MEMORY_BUDGET = 1536 << 20
#: Segments handed to the workers ahead of the one kept next, per worker: a long segment does
#: not idle the other workers. Waiting segments hold nothing (a worker reads the bytes); done
#: ones hold only their patch.
WINDOW = 4


@dataclass
class PatchStats:
    """What generation did, for ``publish --json``."""

    patches: int = 0
    bytes: int = 0
    replaced: int = 0  # chunk bytes the kept patches stand for
    considered: int = 0  # changed bytes compressed (kept or not)
    seconds: float = 0.0
    bases: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        speed = self.considered / self.seconds / 1e6 if self.seconds else 0.0
        return {
            "count": self.patches,
            "bytes": self.bytes,
            "replaces_bytes": self.replaced,
            "from_builds": self.bases,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(speed, 1),
        }


def earlier_builds(out: Path, app: str, build: int, count: int) -> list[tuple[M.Manifest, Path]]:
    """The newest ``count`` builds of ``app`` below ``build`` published in ``out``, with the
    directory holding their files; unreadable ones are skipped."""
    app_dir = out / app
    if count <= 0 or not app_dir.is_dir():
        return []
    numbers = sorted((int(d.name) for d in app_dir.iterdir() if d.name.isdigit()), reverse=True)
    found = []
    for b in numbers:
        if b >= build:
            continue
        try:
            data = (out / layout.manifest_path(app, b)).read_bytes()
            earlier = M.parse_signed(data).manifest
        except (OSError, P2PNodeError):
            continue
        found.append((earlier, out / layout.release_dir(app, b) / "files"))
        if len(found) == count:
            break
    return found


def generate(
    files: Sequence[M.FileEntry],
    root: Path,
    bases: Sequence[tuple[M.Manifest, Path]],
    pack: Path,
    *,
    level: int = DEFAULT_LEVEL,
    workers: int | None = None,
) -> tuple[tuple[Patch, ...], PatchStats]:
    """Patches for ``files`` (their bytes under ``root``) from each of ``bases``, written to
    ``pack``; the pack is not created when no patch is kept.

    Segments are made by ``workers`` threads (default :func:`default_workers`; zstd releases
    the GIL while it compresses). A segment is handed to them only while the memory the
    segments handed out may hold (``_Job.memory``) stays within :data:`MEMORY_BUDGET`
    (one segment always goes). Patches are kept, and written, in the order of a
    single-threaded run: the pack and the manifest do not depend on timing.
    """
    t0 = time.monotonic()
    stats = PatchStats(bases=[m.build for m, _ in bases])
    kept: list[Patch] = []
    offsets: dict[bytes, int] = {}
    out = None
    n = workers or default_workers()
    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="patch") as pool:
            running: deque[tuple[_Job, Future[_Made]]] = deque()

            def held() -> int:
                return sum(job.memory for job, _ in running)

            def settle() -> None:
                nonlocal out
                job, fut = running.popleft()
                made = fut.result()
                stats.considered += job.result_bytes
                if made is None:
                    return
                data, base_chunks = made
                if len(data) > min(MAX_PATCH_BYTES, KEEP_RATIO * job.result_bytes):
                    return
                pid = blake3.blake3(data).digest()
                if pid not in offsets:
                    if out is None:
                        pack.parent.mkdir(parents=True, exist_ok=True)
                        out = open(pack, "wb")  # noqa: SIM115 - closed in finally
                    offsets[pid] = out.tell()
                    out.write(data)
                    stats.bytes += len(data)
                f = job.file
                kept.append(
                    Patch(
                        job.base,
                        f.path,
                        job.first,
                        job.count,
                        base_chunks,
                        offsets[pid],
                        len(data),
                        pid,
                    )
                )
                stats.replaced += job.result_bytes

            for job in _jobs(files, bases):
                need = job.memory
                while running and (len(running) >= WINDOW * n or held() + need > MEMORY_BUDGET):
                    settle()
                running.append((job, pool.submit(_one, job, root, level)))
            while running:
                settle()
    finally:
        if out is not None:
            out.close()
    stats.patches = len(kept)
    stats.seconds = time.monotonic() - t0
    return tuple(kept), stats


def default_workers() -> int:
    """One per core, at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class _Job:
    """One segment to patch: ``count`` chunks of ``file`` from ``first``, against the chunks
    ``stretch`` of ``old`` (a file of build ``base``, its bytes under ``base_root``)."""

    base: bytes
    base_root: Path
    file: M.FileEntry
    old: M.FileEntry
    first: int
    count: int
    stretch: Sequence[M.ChunkRef]

    @property
    def result_bytes(self) -> int:
        return sum(c.length for c in self.file.chunks[self.first : self.first + self.count])

    @property
    def base_bytes(self) -> int:
        return sum(c.length for c in self.stretch)

    @property
    def memory(self) -> int:
        """What making this segment's patch may hold (``delta.patch_memory``). Measured: 64
        MiB of base and 16 MiB of result at level 19 peaked 1.15 GB over the process; this
        says 1.25 GB."""
        return patch_memory(self.base_bytes, self.result_bytes)


def _jobs(files: Sequence[M.FileEntry], bases: Sequence[tuple[M.Manifest, Path]]) -> Iterator[_Job]:
    """Every segment to patch, with the base stretch it reads, in the order patches are
    kept."""
    for base, base_root in bases:
        earlier = _Earlier(base)
        have = earlier.by_chunk.keys()
        for f in files:
            old = earlier.base_file(f)
            if old is None or not old.chunks:
                continue
            for first, count in _segments(f, have):
                start = f.chunks[first].offset
                last = f.chunks[first + count - 1]
                k0, k1 = _base_range(f, first, count, old, start, last.offset + last.length)
                yield _Job(base.id, base_root, f, old, first, count, old.chunks[k0:k1])


class _Earlier:
    """One earlier build, indexed once for finding each new file's base: by path, by chunk
    and by file name (a release of 100,000 files must not compare every pair)."""

    def __init__(self, manifest: M.Manifest) -> None:
        self.by_path = {f.path: f for f in manifest.files}
        self.by_chunk: dict[bytes, M.FileEntry] = {}
        self.by_name: dict[str, list[M.FileEntry]] = {}
        for f in manifest.files:
            for c in f.chunks:
                self.by_chunk.setdefault(c.id, f)
            self.by_name.setdefault(f.path.rsplit("/", 1)[-1], []).append(f)

    def base_file(self, f: M.FileEntry) -> M.FileEntry | None:
        """The earlier file ``f`` most likely came from: same path; else (renamed) the one
        sharing most chunks with it; else one of the same name in another folder (a
        versioned directory such as ``pkg-1.2.dist-info``), the closest in size."""
        same = self.by_path.get(f.path)
        if same is not None:
            return same
        shared = Counter(
            self.by_chunk[c.id].path for c in f.chunks if c.id in self.by_chunk
        ).most_common(1)
        if shared:
            return self.by_path[shared[0][0]]
        named = self.by_name.get(f.path.rsplit("/", 1)[-1], [])
        return min(named, key=lambda old: abs(old.size - f.size), default=None)


def _segments(f: M.FileEntry, have: Collection[bytes]) -> Iterator[tuple[int, int]]:
    """(first, count) of runs of chunks the base lacks, each at most MAX_PATCH_RESULT_BYTES."""
    first, size = -1, 0
    for i, c in enumerate(f.chunks):
        if c.id in have:
            if first >= 0:
                yield first, i - first
            first, size = -1, 0
            continue
        if first >= 0 and size + c.length > MAX_PATCH_RESULT_BYTES:
            yield first, i - first
            first = -1
        if first < 0:
            first, size = i, 0
        size += c.length
    if first >= 0:
        yield first, len(f.chunks) - first


_Made = tuple[bytes, tuple[tuple[bytes, int], ...]] | None


def _one(job: _Job, root: Path, level: int) -> _Made:
    """One segment's patch and the base chunks it reads, or None if the base is unusable."""
    f, stretch = job.file, job.stretch
    start = f.chunks[job.first].offset
    last = f.chunks[job.first + job.count - 1]
    lo = stretch[0].offset
    hi = stretch[-1].offset + stretch[-1].length
    try:
        base = _read(job.base_root / job.old.path, lo, hi - lo)
        result = _read(root / f.path, start, last.offset + last.length - start)
    except OSError:
        return None
    view = memoryview(base)
    if any(hash_chunk(view[c.offset - lo : c.offset - lo + c.length]) != c.id for c in stretch):
        return None  # the earlier build's file is not what its manifest says
    # A fast attempt first: where it is nowhere near worth keeping (new compressed assets,
    # encrypted data), the slow level would not be either, and costs ~20x as much.
    quick = make_patch(base, result, min(level, PROBE_LEVEL))
    if len(quick) > PROBE_RATIO * len(result) or level <= PROBE_LEVEL:
        return quick, tuple((c.id, c.length) for c in stretch)
    return make_patch(base, result, level), tuple((c.id, c.length) for c in stretch)


def _base_range(
    f: M.FileEntry, first: int, count: int, old: M.FileEntry, start: int, end: int
) -> tuple[int, int]:
    """Indices [k0, k1) of the earlier file's chunks to read for result bytes [start, end)."""
    where = {c.id: c.offset for c in old.chunks}
    shift_lo = shift_hi = None
    for j in range(first - 1, max(-1, first - 1 - ANCHOR_SEARCH), -1):
        if f.chunks[j].id in where:
            shift_lo = where[f.chunks[j].id] - f.chunks[j].offset
            break
    for j in range(first + count, min(len(f.chunks), first + count + ANCHOR_SEARCH)):
        if f.chunks[j].id in where:
            shift_hi = where[f.chunks[j].id] - f.chunks[j].offset
            break
    if shift_lo is None and shift_hi is None:
        scale = old.size / f.size if f.size else 1.0
        b0, b1 = int(start * scale), int(end * scale)
    else:
        b0 = start + (shift_lo if shift_lo is not None else shift_hi or 0)
        b1 = end + (shift_hi if shift_hi is not None else shift_lo or 0)
    b1 = max(b0, b1)
    if shift_lo is not None and shift_hi is not None:
        margin = ANCHORED_MARGIN + (end - start) // 8
    else:
        margin = max(MIN_MARGIN, (end - start) // 2)
    lo, hi = max(0, b0 - margin), min(old.size, b1 + margin)
    if hi - lo > MAX_PATCH_BASE_BYTES:  # keep the middle: that is where the segment maps
        mid = (b0 + b1) // 2
        lo = max(0, mid - MAX_PATCH_BASE_BYTES // 2)
        hi = min(old.size, lo + MAX_PATCH_BASE_BYTES)
    if lo >= hi:  # the segment maps past the earlier file's end: read its tail
        lo = max(0, old.size - margin)
        hi = old.size
    offsets = [c.offset for c in old.chunks]
    k0 = max(0, bisect.bisect_right(offsets, lo) - 1)
    k1 = max(k0 + 1, bisect.bisect_left(offsets, hi))
    while k1 - k0 > 1 and sum(c.length for c in old.chunks[k0:k1]) > MAX_PATCH_BASE_BYTES:
        k1 -= 1  # snapping outward to chunk edges may have overshot the bound
    return k0, k1


def _read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(f"{path} is shorter than expected")
    return data
