"""Release manifests: the canonical bencoded description of a release, and its signature.

Theory of operation
-------------------
A manifest lists every file of a release with its size, mode and content-defined chunks. It is
encoded as canonical bencode and signed with the publisher's Ed25519 key; the signed document is
``{"manifest": <canonical bytes>, "signature": <64 bytes>}``, so the signed bytes travel
verbatim and are never re-encoded before checking. The manifest id is blake3 of those bytes.

Everything downstream (planning, fetching, verifying) trusts only what :func:`verify` returns, and
:func:`verify` returns only after all of these hold: the outer and inner documents are canonical
and within size bounds, every field has its type and range, paths are safe and do not collide,
chunk lengths add up to file sizes, the key is pinned by the user, the signature verifies, and
the manifest has not expired. Anything else raises a typed error from :mod:`p2pnode.errors`.

Chunk tables are packed (32-byte id + 4-byte big-endian length per chunk; offsets are implied,
chunks cover a file contiguously from 0), which keeps a 10 GiB release's manifest around 400 KB
and lets it parse in milliseconds: no per-chunk bencode items, no per-byte Python loops.
"""

from __future__ import annotations

import re
import struct
import time
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any, NamedTuple

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ExpiredManifestError, ManifestError, SignatureError, UnsafePathError
from . import canonical, keys
from .metadata import KEYS as METADATA_KEYS
from .metadata import ReleaseInfo
from .patchmeta import Patch, parse_patches, patch_obj

__all__ = [
    "FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "MAX_NOKEEP",
    "READ_FORMATS",
    "ChunkRef",
    "Chunking",
    "FileEntry",
    "Manifest",
    "SignedManifest",
    "could_hold_nokeep",
    "is_name",
    "matches_nokeep",
    "needed_format",
    "parse_signed",
    "sign",
    "validate_nokeep",
    "validate_path",
    "verify",
]

#: The newest format this p2pnode reads and writes; it reads every format in READ_FORMATS. A
#: manifest of a newer format is refused (see :meth:`Manifest.from_obj`); publishing writes the
#: lowest format that holds the release's fields (:func:`needed_format`), so nodes that read
#: only older formats keep installing every release that does not need the new fields.
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
#: Top-level fields format 2 added: a format-1 manifest holding one of them is refused.
SINCE_FORMAT_2 = METADATA_KEYS | frozenset({b"patches"})
SIGNATURE_DOMAIN = b"p2pnode-manifest-v1"

#: 1 TiB of release at 1 MiB average chunks is ~1M chunks * 36 bytes: 64 MiB leaves room for
#: that while still refusing "endless data" from a hostile source.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_FILES = 1_000_000
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
#: No chunker setting we accept produces a larger chunk; bounds every buffer that holds one.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 1 << 48
MAX_MIRRORS = 32
MAX_URL_BYTES = 2048
#: ``nokeep`` patterns: a handful names a build's caches and logs; the bounds keep matching
#: every user entry against them cheap and the field small.
MAX_NOKEEP = 64
MAX_NOKEEP_BYTES = 256

MODE_FILE = 0o644
MODE_EXEC = 0o755

_RECORD = struct.Struct(">32sI")
#: The rule for app and channel names, as a pattern string: the tracker checks names and
#: describes them in its OpenAPI document with this same text.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_~-]{0,127}$")


def is_name(text: str) -> bool:
    """Whether ``text`` may name an app or a channel (the rule every node and tracker shares)."""
    return _NAME.match(text) is not None


class ChunkRef(NamedTuple):
    """One chunk of one file: its blake3 id, and where it sits in the file."""

    id: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Chunking:
    """FastCDC parameters the publisher used; informative for nodes, needed to re-chunk."""

    min: int = 256 * 1024
    avg: int = 1024 * 1024
    max: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (64 <= self.min <= self.avg <= self.max <= MAX_CHUNK_BYTES):
            raise ManifestError(
                f"chunking parameters min={self.min} avg={self.avg} max={self.max} are invalid",
                fix=f"use 64 <= min <= avg <= max <= {MAX_CHUNK_BYTES}",
            )


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    size: int
    mode: int
    chunks: tuple[ChunkRef, ...]

    @property
    def executable(self) -> bool:
        return self.mode == MODE_EXEC

    def packed_chunks(self) -> bytes:
        return b"".join(_RECORD.pack(c.id, c.length) for c in self.chunks)


@dataclass(frozen=True)
class Manifest:
    app: str
    version: str
    build: int
    channel: str
    created: int
    expires: int
    key: bytes
    files: tuple[FileEntry, ...]
    chunking: Chunking = field(default_factory=Chunking)
    previous: bytes | None = None
    mirrors: tuple[str, ...] = ()
    #: 0 (the default) stands for the lowest format that holds the fields (:func:`needed_format`),
    #: so that a manifest without format-2 fields stays byte-identical to what it always was
    #: and readable by nodes that know only format 1; a parsed manifest keeps what it says.
    format: int = 0
    #: Glob patterns over release paths the node must not keep across a switch to this build
    #: (caches, logs it invalidates); see :func:`matches_nokeep`.
    nokeep: tuple[str, ...] = ()
    #: Format 2: update type, release notes, minimum client, platforms (``release.metadata``).
    info: ReleaseInfo = field(default_factory=ReleaseInfo)
    #: Format 2: binary delta patches from earlier builds (``release.patchmeta``).
    patches: tuple[Patch, ...] = ()

    def __post_init__(self) -> None:
        if self.format == 0:
            object.__setattr__(self, "format", needed_format(self))

    def to_obj(self) -> dict[bytes, Any]:
        obj: dict[bytes, Any] = {
            b"app": self.app.encode(),
            b"build": self.build,
            b"channel": self.channel.encode(),
            b"chunking": {
                b"avg": self.chunking.avg,
                b"max": self.chunking.max,
                b"min": self.chunking.min,
            },
            b"created": self.created,
            b"expires": self.expires,
            b"files": [
                {
                    b"chunks": f.packed_chunks(),
                    b"mode": f.mode,
                    b"path": f.path.encode(),
                    b"size": f.size,
                }
                for f in self.files
            ],
            b"format": self.format,
            b"key": self.key,
            b"version": self.version.encode(),
        }
        if self.previous is not None:
            obj[b"previous"] = self.previous
        if self.mirrors:
            obj[b"mirrors"] = [m.encode() for m in self.mirrors]
        if self.nokeep:
            # Omitted when empty, so a manifest without it encodes (and is signed and named)
            # exactly as before the field existed.
            obj[b"nokeep"] = [p.encode() for p in self.nokeep]
        obj.update(self.info.to_obj())
        if self.patches:
            obj[b"patches"] = [patch_obj(p) for p in self.patches]
        return obj

    @cached_property
    def canonical_bytes(self) -> bytes:
        return canonical.encode(self.to_obj())

    @cached_property
    def id(self) -> bytes:
        """blake3 of the canonical unsigned manifest: names this release everywhere."""
        return blake3.blake3(self.canonical_bytes).digest()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def iter_chunks(self) -> Iterator[tuple[FileEntry, ChunkRef]]:
        for f in self.files:
            for c in f.chunks:
                yield f, c

    def unique_chunks(self) -> dict[bytes, int]:
        """Chunk id -> length, each distinct chunk once (a chunk that repeats is fetched once)."""
        return {c.id: c.length for _, c in self.iter_chunks()}

    @classmethod
    def from_obj(cls, obj: Any) -> Manifest:
        """Build a manifest from decoded bencode, checking every field's type and range."""
        d = _dict(obj, "manifest")
        known = {
            b"app",
            b"build",
            b"channel",
            b"chunking",
            b"created",
            b"expires",
            b"files",
            b"format",
            b"key",
            b"mirrors",
            b"nokeep",
            b"previous",
            b"version",
            *METADATA_KEYS,
            b"patches",
        }
        fmt = _int(d, b"format", 1, 1_000)
        # A newer format is refused, not read leniently: what it adds (a field telling how
        # bytes are produced, or who may install) can change what installing it means, and no
        # publisher could rely on a field that old nodes silently skip. Publishers write the
        # lowest format a release needs instead, which is what keeps old nodes updating. The
        # format is checked before unknown fields, so a newer manifest says "upgrade p2pnode".
        if fmt not in READ_FORMATS:
            raise ManifestError(
                f"manifest format {fmt} is not supported (this p2pnode reads formats "
                f"{', '.join(map(str, READ_FORMATS))})",
                fix="upgrade p2pnode",
            )
        unknown = set(d) - known
        if unknown:
            raise ManifestError(f"manifest has unknown fields {sorted(unknown)!r}")
        if fmt < 2 and SINCE_FORMAT_2 & set(d):
            raise ManifestError(
                f"format-1 manifest has format-2 fields {sorted(SINCE_FORMAT_2 & set(d))!r}"
            )
        app = _text(d, b"app")
        if not _NAME.match(app):
            raise ManifestError(f"app name {app!r} is invalid")
        version = _text(d, b"version")
        if not _VERSION.match(version):
            raise ManifestError(f"version {version!r} is invalid")
        channel = _text(d, b"channel")
        if not _NAME.match(channel):
            raise ManifestError(f"channel name {channel!r} is invalid")
        ch = _dict(d.get(b"chunking"), "chunking")
        chunking = Chunking(
            min=_int(ch, b"min", 64, MAX_CHUNK_BYTES),
            avg=_int(ch, b"avg", 64, MAX_CHUNK_BYTES),
            max=_int(ch, b"max", 64, MAX_CHUNK_BYTES),
        )
        key = _bytes(d, b"key")
        if len(key) != 32:
            raise ManifestError("manifest key is not a 32-byte Ed25519 public key")
        previous = d.get(b"previous")
        if previous is not None and (not isinstance(previous, bytes) or len(previous) != 32):
            raise ManifestError("manifest 'previous' is not a 32-byte manifest id")
        mirrors_raw = d.get(b"mirrors", [])
        if not isinstance(mirrors_raw, list) or len(mirrors_raw) > MAX_MIRRORS:
            raise ManifestError(f"manifest 'mirrors' must be a list of at most {MAX_MIRRORS}")
        mirrors = tuple(_url(m) for m in mirrors_raw)
        nokeep_raw = d.get(b"nokeep", None)
        # Present means non-empty: to_obj omits an empty list, so one on the wire was not
        # made by us, and refusing it keeps one encoding per manifest.
        if nokeep_raw is not None and (
            not isinstance(nokeep_raw, list) or not 0 < len(nokeep_raw) <= MAX_NOKEEP
        ):
            raise ManifestError(f"manifest 'nokeep' must be a list of 1..{MAX_NOKEEP} patterns")
        nokeep = tuple(validate_nokeep(_pattern_text(v)) for v in nokeep_raw or ())
        files_raw = d.get(b"files")
        if not isinstance(files_raw, list) or len(files_raw) > MAX_FILES:
            raise ManifestError(f"manifest 'files' must be a list of at most {MAX_FILES} files")
        files = tuple(_file(f, chunking) for f in files_raw)
        _check_collisions(files)
        patches: tuple[Patch, ...] = ()
        if b"patches" in d:
            lengths = {f.path: [c.length for c in f.chunks] for f in files}
            patches = parse_patches(d[b"patches"], lengths)
        created = _int(d, b"created", 0, 1 << 40)
        expires = _int(d, b"expires", 0, 1 << 40)
        if expires <= created:
            raise ManifestError("manifest expires before it was created")
        return cls(
            app=app,
            version=version,
            build=_int(d, b"build", 0, 1 << 62),
            channel=channel,
            created=created,
            expires=expires,
            key=key,
            files=files,
            chunking=chunking,
            previous=previous,
            mirrors=mirrors,
            format=fmt,
            nokeep=nokeep,
            info=ReleaseInfo.from_obj(d),
            patches=patches,
        )


def needed_format(manifest: Manifest) -> int:
    """The lowest format that holds ``manifest``'s fields: what ``publish`` writes."""
    return 1 if manifest.info.empty and not manifest.patches else 2


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with its signature, as parsed from the wire and not yet trusted."""

    manifest: Manifest
    raw: bytes
    signature: bytes

    @property
    def id(self) -> bytes:
        return blake3.blake3(self.raw).digest()

    def encode(self) -> bytes:
        return canonical.encode({b"manifest": self.raw, b"signature": self.signature})


def sign(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    """Sign ``manifest``; its ``key`` field must name ``private_key``'s public half."""
    if manifest.key != keys.public_key_bytes(private_key):
        raise ValueError("manifest.key does not match the signing key")
    raw = manifest.canonical_bytes
    # Round-trip through the parser so a publisher can never sign what nodes would refuse.
    Manifest.from_obj(canonical.decode(raw, what="manifest", max_size=MAX_MANIFEST_BYTES))
    signature = keys.sign(private_key, SIGNATURE_DOMAIN, raw)
    return SignedManifest(manifest, raw, signature)


def parse_signed(data: bytes, *, source: str = "manifest") -> SignedManifest:
    """Parse a signed manifest's structure. Does not check trust: call :func:`verify`."""
    outer = _dict(canonical.decode(data, what=source, max_size=MAX_MANIFEST_BYTES + 1024), source)
    if set(outer) != {b"manifest", b"signature"}:
        raise ManifestError(f"{source} is not a signed p2pnode manifest")
    raw = outer[b"manifest"]
    signature = outer[b"signature"]
    if not isinstance(raw, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
        raise ManifestError(f"{source} is not a signed p2pnode manifest")
    inner = canonical.decode(raw, what=f"{source} (inner)", max_size=MAX_MANIFEST_BYTES)
    return SignedManifest(Manifest.from_obj(inner), raw, signature)


def verify(
    signed: SignedManifest,
    trusted: Collection[bytes],
    *,
    now: float | None = None,
    check_expiry: bool = True,
) -> Manifest:
    """Return the manifest only if a pinned key signed it and it has not expired.

    Raises:
        SignatureError: no trusted key, an unknown key, or a signature that does not verify.
        ExpiredManifestError: ``expires`` is in the past (a freeze attack or an old copy).
            ``check_expiry=False`` is for manifests this node verified when it installed them
            and kept locally (rollback): expiry guards what arrives from the network.
    """
    m = signed.manifest
    if not trusted:
        raise SignatureError(
            "no publisher key is trusted, so no manifest can be accepted",
            fix="pass the publisher's key with --trust ed25519:<hex>",
        )
    if m.key not in trusted:
        raise SignatureError(
            f"manifest for {m.app} is signed by {keys.format_public_key(m.key)}, "
            "which is not a trusted key",
            fix="pass that key with --trust only if you trust its owner; else do not install",
        )
    keys.verify_signature(m.key, signed.signature, SIGNATURE_DOMAIN, signed.raw)
    now = time.time() if now is None else now
    if check_expiry and m.expires <= now:
        raise ExpiredManifestError(
            f"manifest for {m.app} {m.version} (build {m.build}) expired at "
            f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(m.expires))}"
        )
    return m


def validate_path(path: str) -> str:
    """Check a release path: relative, ``/``-separated, NFC, no ``.``/``..``/empty parts, no
    backslashes, colons or control characters. Returns it unchanged or raises UnsafePathError."""
    raw = path.encode("utf-8", "surrogatepass")
    if not path or len(raw) > MAX_PATH_BYTES:
        raise UnsafePathError(f"path {path[:80]!r} is empty or too long")
    if unicodedata.normalize("NFC", path) != path:
        raise UnsafePathError(f"path {path!r} is not in Unicode NFC form")
    if path.startswith("/") or any(ord(ch) < 0x20 or ch in "\\:\x7f" for ch in path):
        raise UnsafePathError(f"path {path!r} is absolute or has forbidden characters")
    for part in path.split("/"):
        if part in ("", ".", "..") or len(part.encode()) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"path {path!r} has an empty, '.', '..' or overlong part")
    return path


def validate_nokeep(pattern: str) -> str:
    """Check a ``nokeep`` pattern: a safe release path (:func:`validate_path`) of at most
    ``MAX_NOKEEP_BYTES`` whose parts may hold ``*``, ``?`` and ``[...]``, each matching within
    one part. ``**`` is refused rather than read as one ``*``, so no publisher mistakes it for
    "any depth" (a pattern already covers everything under what it matches)."""
    if len(pattern.encode("utf-8", "surrogatepass")) > MAX_NOKEEP_BYTES:
        raise UnsafePathError(f"nokeep pattern {pattern[:80]!r} is longer than {MAX_NOKEEP_BYTES}")
    validate_path(pattern)
    if "**" in pattern:
        raise UnsafePathError(
            f"nokeep pattern {pattern!r} has '**'; '*' matches within one path part, and a "
            "pattern also covers everything under what it matches"
        )
    return pattern


def matches_nokeep(path: str, patterns: Collection[str]) -> bool:
    """Whether ``path`` (release-relative) or a folder above it matches one of ``patterns``,
    part by part (``cache/*`` matches ``cache/x`` and ``cache/x/y``, not ``cache``)."""
    parts = path.split("/")
    for pattern in patterns:
        pp = pattern.split("/")
        if len(pp) <= len(parts) and all(map(fnmatchcase, parts, pp)):
            return True
    return False


def could_hold_nokeep(folder: str, patterns: Collection[str]) -> bool:
    """Whether something inside ``folder`` could match a pattern the folder does not: the
    carry then looks inside it instead of moving it whole."""
    parts = folder.split("/")
    for pattern in patterns:
        pp = pattern.split("/")
        if len(pp) > len(parts) and all(map(fnmatchcase, parts, pp)):
            return True
    return False


def _check_collisions(files: tuple[FileEntry, ...]) -> None:
    # Case-insensitive, so that a release installs the same on Windows and macOS; and a file
    # may not also be a directory of another file.
    seen: set[str] = set()
    for f in files:
        key = f.path.casefold()
        if key in seen:
            raise UnsafePathError(f"path {f.path!r} collides with another (case-insensitively)")
        seen.add(key)
    dirs: set[str] = set()
    for f in files:
        parts = f.path.casefold().split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    clash = seen & dirs
    if clash:
        raise UnsafePathError(f"path {sorted(clash)[0]!r} is both a file and a directory")


def _file(obj: Any, chunking: Chunking) -> FileEntry:
    d = _dict(obj, "file entry")
    if set(d) != {b"chunks", b"mode", b"path", b"size"}:
        raise ManifestError("file entry must have exactly chunks, mode, path and size")
    path = validate_path(_text(d, b"path"))
    size = _int(d, b"size", 0, MAX_FILE_BYTES)
    mode = _int(d, b"mode", 0, 0o7777)
    if mode not in (MODE_FILE, MODE_EXEC):
        raise ManifestError(f"file {path!r} has mode {mode:o}; only 644 and 755 are allowed")
    packed = _bytes(d, b"chunks")
    if len(packed) % _RECORD.size:
        raise ManifestError(f"file {path!r} has a truncated chunk table")
    chunks = []
    offset = 0
    for cid, length in _RECORD.iter_unpack(packed):
        if not 0 < length <= chunking.max:
            raise ManifestError(
                f"file {path!r} has a chunk of {length} bytes, outside 1..{chunking.max}"
            )
        chunks.append(ChunkRef(cid, offset, length))
        offset += length
    if offset != size:
        raise ManifestError(
            f"file {path!r}: chunk lengths add up to {offset} bytes, but its size is {size}"
        )
    return FileEntry(path, size, mode, tuple(chunks))


def _dict(obj: Any, what: str) -> dict[bytes, Any]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} is not a dictionary")
    return obj


def _int(d: dict[bytes, Any], key: bytes, lo: int, hi: int) -> int:
    value = d.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ManifestError(f"field {key.decode()!r} must be an integer in {lo}..{hi}")
    return value


def _bytes(d: dict[bytes, Any], key: bytes) -> bytes:
    value = d.get(key)
    if not isinstance(value, bytes):
        raise ManifestError(f"field {key.decode()!r} is missing or not a byte string")
    return value


def _text(d: dict[bytes, Any], key: bytes) -> str:
    try:
        return _bytes(d, key).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"field {key.decode()!r} is not UTF-8") from exc


def _pattern_text(value: Any) -> str:
    if not isinstance(value, bytes):
        raise ManifestError("a nokeep pattern is not a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError("a nokeep pattern is not UTF-8") from exc


def _url(value: Any) -> str:
    if not isinstance(value, bytes) or len(value) > MAX_URL_BYTES:
        raise ManifestError("a mirror URL is not a string or is too long")
    try:
        url = value.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ManifestError("a mirror URL is not ASCII") from exc
    if not (url.startswith("http://") or url.startswith("https://")):
        raise ManifestError(f"mirror URL {url!r} is not http(s)")
    return url
