"""How a signed manifest describes binary delta patches (format 2).

A patch turns bytes a node may already hold (a run of *base chunks*, named by id, from an
earlier build) into a run of this build's chunks (``count`` chunks of ``path`` from chunk
``first``). It is a zstd frame compressed with the concatenated base chunks as a raw-content
dictionary ("patch-from"), and it is content-addressed like a chunk: ``id`` is blake3 of its
bytes, so a node checks it exactly as it checks a chunk, whoever served it.

Base chunks are listed by id rather than by (build, file, range): a node holds them wherever
they are (an installed file, a kept build, the chunk store, a renamed file) and needs no older
manifest to plan or apply. ``base`` names the build they came from, for people and reports.

This module holds only the description and its checks; it imports nothing from
:mod:`p2pnode.release.manifest` so that the manifest can import it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ManifestError

__all__ = [
    "MAX_PATCHES",
    "MAX_PATCH_BASE_BYTES",
    "MAX_PATCH_BYTES",
    "MAX_PATCH_RESULT_BYTES",
    "Patch",
    "parse_patches",
    "patch_obj",
    "window_log",
]

#: A patch's result: bounded so that applying one holds at most this much output, and
#: generating one compresses at most this much against its base.
MAX_PATCH_RESULT_BYTES = 16 * 1024 * 1024
#: The dictionary a patch reads: with the result, what a node holds in memory to apply it
#: (the node must stay far below 256 MB while patching a 4 GiB file).
MAX_PATCH_BASE_BYTES = 64 * 1024 * 1024
#: A patch is never larger than the chunks it replaces (else it is not kept), so the chunk
#: bound also bounds every patch buffer.
MAX_PATCH_BYTES = 16 * 1024 * 1024
MAX_PATCHES = 1_000_000

_RECORD = struct.Struct(">32sI")
_FIELDS = {b"base", b"chunks", b"count", b"first", b"id", b"offset", b"path", b"size"}


@dataclass(frozen=True, slots=True)
class Patch:
    """One patch: ``size`` bytes at ``offset`` of the release's patch pack."""

    base: bytes  # manifest id of the build the base chunks come from
    path: str  # the file whose chunks it produces
    first: int  # index of the first chunk it produces in that file's chunk table
    count: int  # how many consecutive chunks it produces
    base_chunks: tuple[tuple[bytes, int], ...]  # (id, length), concatenated = the dictionary
    offset: int
    size: int
    id: bytes  # blake3 of the patch's bytes

    @property
    def base_bytes(self) -> int:
        return sum(n for _, n in self.base_chunks)


def window_log(base_bytes: int, result_bytes: int) -> int:
    """The zstd window (log2) a patch is made with and applied with: it covers the base and
    the result, so every match into the base is in reach. Both sides derive it from sizes the
    manifest gives, so it is never a separate field."""
    return max(10, (base_bytes + result_bytes).bit_length())


def patch_obj(p: Patch) -> dict[bytes, Any]:
    return {
        b"base": p.base,
        b"chunks": b"".join(_RECORD.pack(cid, n) for cid, n in p.base_chunks),
        b"count": p.count,
        b"first": p.first,
        b"id": p.id,
        b"offset": p.offset,
        b"path": p.path.encode(),
        b"size": p.size,
    }


def parse_patches(raw: Any, chunk_lengths: Mapping[str, Sequence[int]]) -> tuple[Patch, ...]:
    """Check and build the ``patches`` list; ``chunk_lengths`` is path -> the file's chunk
    lengths (from the already-checked file entries)."""
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_PATCHES:
        raise ManifestError(f"manifest 'patches' must be a list of 1..{MAX_PATCHES} patches")
    return tuple(_patch(obj, chunk_lengths) for obj in raw)


def _patch(obj: Any, chunk_lengths: Mapping[str, Sequence[int]]) -> Patch:
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        raise ManifestError(
            f"a patch entry must have exactly {sorted(k.decode() for k in _FIELDS)}"
        )
    base, pid, packed, path_raw = obj[b"base"], obj[b"id"], obj[b"chunks"], obj[b"path"]
    if not (isinstance(base, bytes) and len(base) == 32 and isinstance(pid, bytes)):
        raise ManifestError("a patch's base or id is not a 32-byte id")
    if len(pid) != 32 or not isinstance(packed, bytes) or not isinstance(path_raw, bytes):
        raise ManifestError("a patch's id, chunks or path is malformed")
    try:
        path = path_raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError("a patch's path is not UTF-8") from exc
    lengths = chunk_lengths.get(path)
    if lengths is None:
        raise ManifestError(f"a patch produces {path!r}, which is not a file of the release")
    first, count = _int(obj, b"first", len(lengths)), _int(obj, b"count", len(lengths))
    if count == 0 or first + count > len(lengths):
        raise ManifestError(f"a patch of {path!r} produces chunks outside the file")
    if sum(lengths[first : first + count]) > MAX_PATCH_RESULT_BYTES:
        raise ManifestError(
            f"a patch of {path!r} produces more than {MAX_PATCH_RESULT_BYTES} bytes"
        )
    if not packed or len(packed) % _RECORD.size:
        raise ManifestError(f"a patch of {path!r} has an empty or truncated base chunk table")
    base_chunks = tuple(_RECORD.iter_unpack(packed))
    total = sum(n for _, n in base_chunks)
    if any(n == 0 for _, n in base_chunks) or total > MAX_PATCH_BASE_BYTES:
        raise ManifestError(f"a patch of {path!r} reads more than {MAX_PATCH_BASE_BYTES} bytes")
    size = _int(obj, b"size", MAX_PATCH_BYTES)
    if size == 0:
        raise ManifestError(f"a patch of {path!r} is empty")
    return Patch(base, path, first, count, base_chunks, _int(obj, b"offset", 1 << 48), size, pid)


def _int(d: dict[bytes, Any], key: bytes, hi: int) -> int:
    value = d.get(key)
    if type(value) is not int or not 0 <= value <= hi:
        raise ManifestError(f"patch field {key.decode()!r} must be an integer in 0..{hi}")
    return value
