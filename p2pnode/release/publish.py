"""Turn a directory into a signed release laid out for any static HTTP server.

Each file is read once: the bytes go to the CDN copy and through the chunker in the same pass,
so the manifest always describes exactly the bytes that were published, even if the source
changes while we read it. The release is assembled in a hidden temporary directory and renamed
into place at the end, so a mirror never serves half a build, and a build number, once published,
is immutable.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..disk.fsutil import write_atomic
from ..errors import ManifestError, P2PNodeError, UnsafePathError, UsageError
from ..progress import NullProgress, Progress
from . import keys, layout
from . import manifest as M
from .chunker import chunk_stream
from .delta import DEFAULT_LEVEL
from .metadata import (
    MAX_NOTES_BYTES,
    ReleaseInfo,
    UpdateType,
    normalise_platforms,
    normalise_version,
)
from .patches import DEFAULT_FROM_BUILDS, PatchStats, earlier_builds, generate
from .patchmeta import Patch

__all__ = ["PublishResult", "collect_files", "publish", "read_notes", "release_info"]

DEFAULT_LIFETIME = 365 * 24 * 3600


@dataclass(frozen=True)
class PublishResult:
    manifest: M.Manifest
    signed: M.SignedManifest
    manifest_path: str  # relative to the output directory
    channel_path: str
    patches: PatchStats | None = None  # None: patches were not asked for

    def as_json(self) -> dict[str, object]:
        m = self.manifest
        out: dict[str, object] = {
            "manifest": self.manifest_path,
            "manifest_id": m.id.hex(),
            "channel_manifest": self.channel_path,
            "app": m.app,
            "version": m.version,
            "build": m.build,
            "channel": m.channel,
            "files": len(m.files),
            "bytes": m.total_size,
            "chunks": len(m.unique_chunks()),
            "key": keys.format_public_key(m.key),
            "nokeep": list(m.nokeep),
            "format": m.format,
            **m.info.as_json(),
        }
        if self.patches is not None:
            out["patches"] = self.patches.as_json()
        return out


def release_info(
    *,
    update_type: str | None = None,
    notes: str | None = None,
    min_client: str | None = None,
    platforms: Sequence[str] = (),
) -> ReleaseInfo:
    """The metadata a publisher gave (``--type``, ``--notes``, ``--min-client``,
    ``--platform``), normalised to its one spelling and checked as nodes will check it.

    Raises:
        UsageError: a value nodes would refuse, saying which and what is allowed.
    """
    try:
        kind = None if update_type is None else UpdateType(update_type.strip().lower())
    except ValueError as exc:
        names = ", ".join(t.value for t in UpdateType)
        raise UsageError(f"--type {update_type!r} is not one of {names}") from exc
    try:
        version = None if min_client is None else normalise_version(min_client)
        plats = normalise_platforms(platforms)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        return ReleaseInfo(kind, notes or "", version, plats)
    except ManifestError as exc:
        raise UsageError(exc.message, fix=exc.fix) from exc


def read_notes(path: Path) -> str:
    """Release notes from a UTF-8 text file (``--notes FILE``), refused beyond the bound
    without reading the rest of a file that is far too large."""
    with open(path, "rb") as f:
        data = f.read(MAX_NOTES_BYTES + 1)
    if len(data) > MAX_NOTES_BYTES:
        raise UsageError(
            f"release notes in {path} are longer than {MAX_NOTES_BYTES} bytes",
            fix="shorten the notes and link to the full changelog",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"release notes in {path} are not UTF-8 text", fix="save the file as UTF-8"
        ) from exc


def collect_files(src: Path) -> list[tuple[str, Path, bool]]:
    """(release path, source path, executable) for every regular file under ``src``, sorted."""
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory", fix="pass the release's root directory")
    found: list[tuple[str, Path, bool]] = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if (Path(root) / d).is_symlink()]:
            full = Path(root) / name
            rel = full.relative_to(src).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise UsageError(
                    f"{full} is a symbolic link; releases hold regular files only",
                    fix="replace the link with the file it points to, or remove it",
                )
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{full} is not a regular file", fix="remove it from the release")
            M.validate_path(rel)
            found.append((rel, full, bool(st.st_mode & 0o111)))
    found.sort(key=lambda item: item[0])
    return found


def _previous_manifest(out: Path, app: str, channel: str, build: int) -> bytes | None:
    pointer = out / layout.channel_manifest_path(app, channel)
    if not pointer.exists():
        return None
    try:
        prev = M.parse_signed(pointer.read_bytes(), source=str(pointer)).manifest
    except P2PNodeError:
        return None
    if prev.build >= build:
        raise UsageError(
            f"channel {channel!r} of {app} already has build {prev.build}; builds only go up",
            fix=f"publish with --build {prev.build + 1} or higher",
        )
    return prev.id


def publish(
    src: Path,
    *,
    app: str,
    version: str,
    build: int,
    key: Ed25519PrivateKey,
    out: Path,
    channel: str = "stable",
    mirrors: Sequence[str] = (),
    nokeep: Sequence[str] = (),
    info: ReleaseInfo | None = None,
    lifetime: int = DEFAULT_LIFETIME,
    chunking: M.Chunking | None = None,
    progress: Progress | None = None,
    patch_from_builds: int = DEFAULT_FROM_BUILDS,
    patch_level: int = DEFAULT_LEVEL,
) -> PublishResult:
    """Publish ``src`` as ``app`` ``version`` (build ``build``) under ``out``, with ``info``
    (update type, notes, minimum client, platforms) signed into its manifest, and patches from
    the newest ``patch_from_builds`` earlier builds found there (0: none), made at zstd level
    ``patch_level``."""
    chunking = chunking or M.Chunking()
    files = collect_files(src)
    progress = progress or NullProgress()
    now = int(time.time())
    if len(nokeep) > M.MAX_NOKEEP:
        raise UsageError(
            f"{len(nokeep)} --never-keep patterns; a manifest holds at most {M.MAX_NOKEEP}",
            fix="name folders ('cache') rather than each file in them",
        )
    # Validate the cheap fields before reading gigabytes.
    probe = M.Manifest(
        app=app,
        version=version,
        build=build,
        channel=channel,
        created=now,
        expires=now + lifetime,
        key=keys.public_key_bytes(key),
        files=(),
        chunking=chunking,
        mirrors=tuple(mirrors),
        nokeep=tuple(nokeep),
        info=info or ReleaseInfo(),
    )
    try:
        M.Manifest.from_obj(probe.to_obj())
    except UnsafePathError as exc:
        raise UsageError(
            exc.message, fix="--never-keep takes a path relative to the release, with * ? [..]"
        ) from exc
    except ManifestError as exc:
        raise UsageError(exc.message, fix="use letters, digits, '.', '_' and '-'") from exc
    final = out / layout.release_dir(app, build)
    if final.exists():
        raise UsageError(
            f"build {build} of {app} is already published at {final}",
            fix="builds are immutable: publish with a higher --build",
        )
    previous = _previous_manifest(out, app, channel, build)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{build}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    progress.start(sum(p.stat().st_size for _, p, _ in files), f"publish {app} {version}")
    try:
        entries = [
            _copy_and_chunk(src_path, tmp / "files" / rel, rel, exe, chunking, progress)
            for rel, src_path, exe in files
        ]
        stats = None
        patches: tuple[Patch, ...] = ()
        if patch_from_builds > 0:
            bases = earlier_builds(out, app, build, patch_from_builds)
            pack = tmp / "patches" / layout.PATCH_PACK
            patches, stats = generate(entries, tmp / "files", bases, pack, level=patch_level)
        # format=0: the lowest format that holds every field, the files' included.
        manifest = dataclasses.replace(
            probe, files=tuple(entries), previous=previous, patches=patches, format=0
        )
        signed = M.sign(manifest, key)
        blob = signed.encode()
        write_atomic(tmp / layout.MANIFEST_NAME, blob)
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.finish()
    pointer = out / layout.channel_manifest_path(app, channel)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(pointer, blob)
    return PublishResult(
        manifest,
        signed,
        layout.manifest_path(app, build),
        layout.channel_manifest_path(app, channel),
        stats,
    )


def _copy_and_chunk(
    src: Path,
    dest: Path,
    rel: str,
    executable: bool,
    chunking: M.Chunking,
    progress: Progress,
) -> M.FileEntry:
    dest.parent.mkdir(parents=True, exist_ok=True)
    mode = M.MODE_EXEC if executable else M.MODE_FILE
    with open(src, "rb") as fin, open(dest, "wb") as fout:

        def sink(view: memoryview) -> None:
            fout.write(view)
            progress.advance(len(view))

        chunks = tuple(chunk_stream(fin, chunking, sink=sink))
        fout.flush()
        os.fchmod(fout.fileno(), mode)
    size = chunks[-1].offset + chunks[-1].length if chunks else 0
    return M.FileEntry(rel, size, mode, chunks)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
