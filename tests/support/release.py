"""Releases for tests: the publisher key, small game trees, and TestRelease builds."""

from __future__ import annotations

import io
import os
import random
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.cdn.fetcher import ChunkRequest
from p2pnode.disk.state import InstallState, StateDir
from p2pnode.release import canonical, keys, layout
from p2pnode.release import manifest as M
from p2pnode.release import rotation as R
from p2pnode.release.chunker import chunk_stream
from p2pnode.release.manifest import Chunking, Manifest

KEY = keys.generate_key()


PUB = keys.public_key_bytes(KEY)


TRUST = [PUB]


def small_manifest(**fields: object) -> M.Manifest:
    """A one-file manifest of app "game" 1.0 (build 1) by KEY, valid for an hour, for checks
    that need no real files; ``fields`` override any field."""
    now = int(time.time())
    base: dict[str, object] = dict(
        app="game",
        version="1.0",
        build=1,
        channel="stable",
        created=now,
        expires=now + 3600,
        key=PUB,
        files=(M.FileEntry("a.txt", 5, 0o644, (M.ChunkRef(bytes(32), 0, 5),)),),
    )
    return M.Manifest(**{**base, **fields})  # type: ignore[arg-type]


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


def make_release(root: Path, seed: int = 1, big: int = 12 << 20) -> None:
    rng = random.Random(seed)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "data" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "bin" / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "data" / "big.pak").write_bytes(rng.randbytes(big))
    (root / "data" / "sub" / "small.txt").write_bytes(b"hello\n" * 100)
    (root / "data" / "dup.pak").write_bytes((root / "data" / "big.pak").read_bytes()[: 3 << 20])
    (root / "empty").write_bytes(b"")


#: Small chunks so a few MB of test data make dozens of chunks.
TEST_CHUNKING = Chunking(min=16 * 1024, avg=64 * 1024, max=256 * 1024)


@dataclass
class TestRelease:
    __test__ = False  # not a test class, despite the name

    root: Path
    app: str
    build: int
    files: dict[str, bytes]
    requests: list[ChunkRequest]

    @property
    def file_sizes(self) -> dict[str, int]:
        return {p: len(d) for p, d in self.files.items()}

    @property
    def total(self) -> int:
        return sum(r.length for r in self.requests)

    def data_of(self, req: ChunkRequest) -> bytes:
        return self.files[req.path][req.offset : req.end]

    def disk_path(self, path: str) -> Path:
        return self.root / layout.release_dir(self.app, self.build) / "files" / path


def build_release(
    root: Path,
    files: dict[str, bytes],
    *,
    app: str = "game",
    build: int = 1,
    chunking: Chunking = TEST_CHUNKING,
) -> TestRelease:
    requests: list[ChunkRequest] = []
    for path, data in sorted(files.items()):
        dest = root / layout.release_dir(app, build) / "files" / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        for c in chunk_stream(io.BytesIO(data), chunking):
            requests.append(ChunkRequest(c.id, path, c.offset, c.length))
    return TestRelease(root, app, build, dict(files), requests)


def random_files(seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {path: rng.randbytes(n) for path, n in sizes.items()}


def scatter_edits(data: bytes, seed: int, n: int) -> bytes:
    """``data`` with ``n`` 40-byte overwrites at random places (a patched asset, a rebuild)."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(n):
        at = rng.randrange(len(out) - 100)
        out[at : at + 40] = rng.randbytes(40)
    return bytes(out)


def publish_pack_builds(root: Path, packs: list[bytes], **kw: object) -> list[Manifest]:
    """Builds 1, 2, ... of app ``game`` under ``root / "cdn"``, each holding one of ``packs``
    as ``data/pack.bin`` beside a ``readme.txt`` that never changes (sources in
    ``root / "src<build>"``); published with patches unless ``kw`` says otherwise, at a
    low zstd level (the format is the same at every level; level 19 costs seconds)."""
    from p2pnode.release.publish import publish

    out = []
    for build, pack in enumerate(packs, 1):
        src = root / f"src{build}"
        (src / "data").mkdir(parents=True)
        (src / "data" / "pack.bin").write_bytes(pack)
        (src / "readme.txt").write_bytes(b"same in every build\n" * 50)
        r = publish(
            src,
            app="game",
            version=f"1.{build}",
            build=build,
            key=KEY,
            out=root / "cdn",
            chunking=TEST_CHUNKING,
            **{"patch_level": 6, **kw},  # type: ignore[arg-type]
        )
        out.append(r.manifest)
    return out


def rotation(
    old: Ed25519PrivateKey,
    new: Ed25519PrivateKey,
    until: int,
    *,
    app: str = "game",
    signer: Ed25519PrivateKey | None = None,
) -> R.SignedRotation:
    """``old`` hands ``app`` over to ``new``, its builds refused from ``until``; signed by
    ``signer`` instead of ``old`` for a forgery (the new key's word for the old)."""
    r = R.Rotation(app, keys.public_key_bytes(old), keys.public_key_bytes(new), until, 0)
    raw = canonical.encode(r.to_obj())
    return R.SignedRotation(r, raw, keys.sign(signer or old, R.ROTATION_DOMAIN, raw))


def pinned_install(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Path, Path]:
    """An install of "game" pinned to ``key`` whose mirror is a folder; (dest, mirror)."""
    dest, mirror = tmp_path / "game", tmp_path / "cdn"
    (mirror / "game").mkdir(parents=True)
    sd = StateDir(dest)
    sd.create()
    pinned = [keys.format_public_key(keys.public_key_bytes(key))]
    sd.save(InstallState(app="game", trusted=pinned, mirrors=[f"{mirror}/"]))
    return dest, mirror


def mirror_chain(mirror: Path, *rotations: R.SignedRotation) -> str:
    """Put a rotations document of "game" on ``mirror``; its digest (the feed's key_chain)."""
    doc = R.encode_list(list(rotations))
    (mirror / layout.rotations_path("game")).write_bytes(doc)
    return R.chain_digest(doc)
