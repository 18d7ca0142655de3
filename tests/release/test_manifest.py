"""Manifest codec and trust checks, without any IO."""

from __future__ import annotations

import io
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import (
    ExpiredManifestError,
    ManifestError,
    NotCanonicalError,
    P2PNodeError,
    SignatureError,
    UnsafePathError,
)
from p2pnode.release import canonical, keys
from p2pnode.release import manifest as M
from p2pnode.release.chunker import chunk_stream

KEY = keys.generate_key()
PUB = keys.public_key_bytes(KEY)


def make_manifest(files: dict[str, bytes], **kw: object) -> M.Manifest:
    entries = []
    for path, data in sorted(files.items()):
        chunks = tuple(chunk_stream(io.BytesIO(data), M.Chunking(1024, 4096, 16384)))
        entries.append(M.FileEntry(path, len(data), 0o644, chunks))
    now = int(time.time())
    fields: dict[str, object] = dict(
        app="game",
        version="1.0",
        build=1,
        channel="stable",
        created=now,
        expires=now + 3600,
        key=PUB,
        files=tuple(entries),
        chunking=M.Chunking(1024, 4096, 16384),
    )
    fields.update(kw)
    return M.Manifest(**fields)  # type: ignore[arg-type]


def test_sign_parse_verify_round_trip() -> None:
    m = make_manifest({"a.txt": b"hello", "dir/b.bin": os.urandom(50_000), "empty": b""})
    blob = M.sign(m, KEY).encode()
    got = M.verify(M.parse_signed(blob), {PUB})
    assert got == m
    assert got.id == m.id
    assert sum(c.length for c in got.files[1].chunks) == 50_000


def test_every_single_byte_change_is_rejected() -> None:
    blob = M.sign(make_manifest({"a.txt": b"x" * 3000}), KEY).encode()
    for i in range(0, len(blob), max(1, len(blob) // 200)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(P2PNodeError):
            M.verify(M.parse_signed(bytes(bad)), {PUB})


def test_other_key_and_untrusted_key() -> None:
    other = keys.generate_key()
    m = make_manifest({"a": b"1"}, key=keys.public_key_bytes(other))
    blob = M.sign(m, other).encode()
    with pytest.raises(SignatureError, match="not a trusted key"):
        M.verify(M.parse_signed(blob), {PUB})
    # Right key id in the manifest, signature by another key.
    m2 = make_manifest({"a": b"1"})
    forged = canonical.encode(
        {b"manifest": m2.canonical_bytes, b"signature": other.sign(b"x" + m2.canonical_bytes)}
    )
    with pytest.raises(SignatureError, match="does not verify"):
        M.verify(M.parse_signed(forged), {PUB})


def test_expired() -> None:
    m = make_manifest({"a": b"1"}, created=1000, expires=2000)
    with pytest.raises(ExpiredManifestError):
        M.verify(M.parse_signed(M.sign(m, KEY).encode()), {PUB})


def test_non_canonical_outer_is_refused() -> None:
    m = make_manifest({"a": b"1"})
    s = M.sign(m, KEY)
    raw = s.raw
    # keys out of order: signature before manifest
    unsorted = (
        b"d9:signature64:"
        + s.signature
        + b"8:manifest"
        + str(len(raw)).encode()
        + b":"
        + raw
        + b"e"
    )
    with pytest.raises(NotCanonicalError):
        M.parse_signed(unsorted)
    dup = b"d8:manifest1:x" + s.encode()[1:]
    with pytest.raises(ManifestError):
        M.parse_signed(dup)


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "", "a\\b", "c:x", "a\x00b", "e\u0301"],
)
def test_unsafe_paths(path: str) -> None:
    with pytest.raises(UnsafePathError):
        M.validate_path(path)


def test_collisions() -> None:
    with pytest.raises(UnsafePathError, match="collides"):
        M.sign(make_manifest({"Readme": b"1", "README": b"2"}), KEY)
    with pytest.raises(UnsafePathError, match="both a file and a directory"):
        M.sign(make_manifest({"a": b"1", "a/b": b"2"}), KEY)


def test_sizes_must_add_up() -> None:
    m = make_manifest({"a": b"x" * 5000})
    obj = m.to_obj()
    obj[b"files"][0][b"size"] = 4999
    with pytest.raises(ManifestError, match="add up"):
        M.Manifest.from_obj(canonical.decode(canonical.encode(obj), max_size=1 << 20))


def test_oversized_is_refused_before_decoding() -> None:
    with pytest.raises(ManifestError, match="over the limit"):
        M.parse_signed(b"x" * (M.MAX_MANIFEST_BYTES + 2048))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_give_typed_errors(data: bytes) -> None:
    try:
        M.parse_signed(data)
    except P2PNodeError:
        pass


bencodable = st.recursive(
    st.integers(min_value=-(2**70), max_value=2**70) | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.binary(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(bencodable)
def test_canonical_round_trip(value: object) -> None:
    blob = canonical.encode(value)
    assert canonical.decode(blob, max_size=1 << 20) == value


@settings(max_examples=200, deadline=None)
@given(bencodable, st.integers(min_value=0, max_value=1000), st.integers(0, 255))
def test_mutated_bencode_never_crashes(value: object, pos: int, byte: int) -> None:
    blob = bytearray(canonical.encode(value))
    blob[pos % len(blob)] = byte
    try:
        canonical.decode(bytes(blob), max_size=1 << 20)
    except ManifestError:
        pass


def _golden(**kw: object) -> M.Manifest:
    fields: dict[str, object] = dict(
        app="game",
        version="1.0",
        build=7,
        channel="stable",
        created=1_700_000_000,
        expires=1_800_000_000,
        key=bytes(range(32)),
        files=(M.FileEntry("saves/readme.txt", 5, 0o644, (M.ChunkRef(bytes(32), 0, 5),)),),
        previous=bytes([1]) * 32,
        mirrors=("https://cdn.example/",),
    )
    fields.update(kw)
    return M.Manifest(**fields)  # type: ignore[arg-type]


def test_manifest_without_nokeep_encodes_as_before_the_field() -> None:
    # Id computed by the code before `nokeep` existed: every published manifest, signature and
    # id stays valid only if this never changes.
    m = _golden()
    assert m.id.hex() == "9db5a957fb5a7eaf6f8cd65d063277b3a2c40c4ce8897d2a7d85f125775700b7"
    assert b"nokeep" not in m.to_obj()
    got = M.parse_signed(M.sign(_golden(key=PUB), KEY).encode()).manifest
    assert got.nokeep == ()


def test_nokeep_round_trips_signed() -> None:
    m = make_manifest({"a.txt": b"hello"}, nokeep=("cache/*", "logs", "shader?.bin"))
    got = M.verify(M.parse_signed(M.sign(m, KEY).encode()), {PUB})
    assert got.nokeep == ("cache/*", "logs", "shader?.bin")
    assert got.id == m.id != make_manifest({"a.txt": b"hello"}).id


@pytest.mark.parametrize(
    "pattern",
    [
        "/abs/*",
        "../x",
        "a/../b",
        "a//b",
        "./a",
        "a\\b",
        "c:*",
        "x\x00",
        "cache/**",
        "a" * 257,
        "e\u0301",
    ],
)
def test_bad_nokeep_patterns_are_refused(pattern: str) -> None:
    m = make_manifest({"a.txt": b"hello"}, nokeep=(pattern,))
    with pytest.raises(P2PNodeError):
        M.sign(m, KEY)


def test_nokeep_list_is_bounded_and_never_empty() -> None:
    with pytest.raises(ManifestError):
        M.sign(make_manifest({}, nokeep=tuple(f"c{i}" for i in range(M.MAX_NOKEEP + 1))), KEY)
    obj = make_manifest({}).to_obj()
    obj[b"nokeep"] = []
    with pytest.raises(ManifestError):
        M.Manifest.from_obj(obj)
    obj[b"nokeep"] = [5]
    with pytest.raises(ManifestError):
        M.Manifest.from_obj(obj)


def test_nokeep_matching_is_per_part() -> None:
    pats = ("cache/*", "logs")
    assert M.matches_nokeep("cache/x", pats)
    assert M.matches_nokeep("cache/x/y", pats)
    assert M.matches_nokeep("logs/today.log", pats)
    assert not M.matches_nokeep("cache", pats)
    assert not M.matches_nokeep("saves/cache/x", pats)
    assert not M.matches_nokeep("saves/slot1.sav", pats)
    assert M.could_hold_nokeep("cache", pats)
    assert not M.could_hold_nokeep("saves", pats)
