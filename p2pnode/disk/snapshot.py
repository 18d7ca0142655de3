"""The installed tree as it was switched in: each file's size and mtime, kept beside it.

"Is the build still there?" must be cheap enough to ask before every "unchanged" answer, yet
never wrong about a tree someone deleted or edited. A stat per file answers it: a file whose
size and mtime match the record is taken as written (the switch wrote and verified it); only a
file whose mtime moved is hashed again, and if it still verifies the record learns its new
mtime. Installs switched in before records existed are checked by size and mode once, and
recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..release import manifest as M
from .fsutil import write_atomic
from .scan import MISSING, file_problem
from .state import StateDir

__all__ = ["Health", "check", "record"]

SNAPSHOT_FORMAT = 1


@dataclass
class Health:
    """How the tree at the install directory compares with the build the state names."""

    gone: bool = False  # no install directory at all
    missing: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # path -> what is wrong

    @property
    def ok(self) -> bool:
        return not (self.gone or self.missing or self.damaged)

    def as_json(self) -> dict[str, Any]:
        word = "missing" if self.gone else "ok" if self.ok else "damaged"
        return {"install": word, "missing": self.missing, "damaged": self.damaged}


def _load(sd: StateDir, manifest: M.Manifest) -> dict[str, list[int]] | None:
    try:
        obj = json.loads(sd.snapshot.read_bytes())
    except (OSError, ValueError):
        return None
    if obj.get("format") != SNAPSHOT_FORMAT or obj.get("manifest") != manifest.id.hex():
        return None
    files = obj.get("files")
    return files if isinstance(files, dict) else None


def _save(sd: StateDir, manifest: M.Manifest, files: dict[str, list[int]]) -> None:
    obj = {"format": SNAPSHOT_FORMAT, "manifest": manifest.id.hex(), "files": files}
    write_atomic(sd.snapshot, json.dumps(obj, separators=(",", ":")).encode(), 0o600)


def record(sd: StateDir, manifest: M.Manifest) -> None:
    """Remember the sizes and mtimes of ``manifest``'s files as they are now in the tree."""
    files: dict[str, list[int]] = {}
    for f in manifest.files:
        try:
            st = (sd.dest / f.path).lstat()
        except OSError:
            continue
        files[f.path] = [st.st_size, st.st_mtime_ns]
    _save(sd, manifest, files)


def check(sd: StateDir, manifest: M.Manifest, *, update: bool = True) -> Health:
    """Compare the tree with the record (see the module text). ``update``: the caller holds the
    install's lock, and the record may learn new mtimes of files that still verify."""
    if not sd.dest.is_dir():
        return Health(gone=True)
    seen = _load(sd, manifest)
    fresh: dict[str, list[int]] = dict(seen or {})
    health = Health()
    for f in manifest.files:
        now: list[int] = []

        def deep(st: os.stat_result, path: str = f.path, now: list[int] = now) -> bool:
            now[:] = [st.st_size, st.st_mtime_ns]
            return seen is not None and seen.get(path) != now

        why, _bad = file_problem(sd.dest, f, deep)
        if why == MISSING:
            health.missing.append(f.path)
        elif why is not None:
            health.damaged[f.path] = why
        elif now:
            fresh[f.path] = now
    if update and health.ok and fresh != seen:
        _save(sd, manifest, fresh)
    return health
