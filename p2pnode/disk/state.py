"""The local state of one install directory, kept beside it.

For an install at ``PARENT/NAME`` everything p2pnode needs lives in ``PARENT/.NAME.p2pnode/``,
on the same filesystem (so trees can be renamed into place) and outside the install (which holds
the published files and the user's own, see userfiles.py). If ``PARENT/NAME`` is a symbolic link,
``PARENT/NAME`` here is its target (linkeddest.py)::

    state.json          current manifest id, kept versions, pinned keys, mirrors, pending step
    keychain.json       publisher key rotations learnt from the feed's polls (node/rotations.py)
    lock                flock'd while a process works on this install
    manifests/<id>.p2pm signed manifests of the current and kept versions
    store/<hh>/<id>     chunks of kept versions that the current version does not have
    stage/              the next version being assembled (see stage.py)
    stage.journal       which chunks of stage/ are verified and written
    old/                the previous tree right after a switch, until the user's files in it
                        are carried into the new tree and its chunks are harvested
    tree.json           size and mtime of each installed file at switch time (snapshot.py)
    quarantine/         leftovers of earlier builds that ``verify --repair`` moved out

``state.json`` is replaced atomically; a ``pending`` entry records a switch or harvest in
progress so that the next run finishes it (see switch.py, "Recovery").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InstallError, InstallLockedError, NotInstalledError
from ..release import manifest as M
from .fsutil import LockedDir, write_atomic
from .linkeddest import adopt_state_beside_link, resolve, state_root

__all__ = ["InstallState", "StateDir"]

STATE_FORMAT = 1


@dataclass
class InstallState:
    app: str | None = None
    current: str | None = None  # manifest id (hex) of the installed version
    history: list[str] = field(default_factory=list)  # kept earlier versions, newest first
    trusted: list[str] = field(default_factory=list)  # ed25519:<hex> pinned at install time
    mirrors: list[str] = field(default_factory=list)  # mirror roots that served us last
    pending: dict[str, Any] | None = None
    #: publisher key rotations learnt (hex of the signed statements, release/rotation.py)
    rotations: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        obj = {
            "format": STATE_FORMAT,
            "app": self.app,
            "current": self.current,
            "history": self.history,
            "trusted": self.trusted,
            "mirrors": self.mirrors,
            "pending": self.pending,
            "rotations": self.rotations,
        }
        return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> InstallState:
        try:
            obj = json.loads(data)
            if obj.get("format") != STATE_FORMAT:
                raise ValueError("unknown state format")
            return cls(
                app=obj["app"],
                current=obj["current"],
                history=list(obj["history"]),
                trusted=list(obj["trusted"]),
                mirrors=list(obj["mirrors"]),
                pending=obj.get("pending"),
                rotations=list(obj.get("rotations", [])),  # absent before key rotation
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InstallError(
                f"install state {where} is damaged: {exc}",
                fix=f"move {where.parent} aside and install again",
            ) from exc


class StateDir(LockedDir):
    """Paths and persistent records of the install at ``dest``.

    A ``dest`` that is a symbolic link is resolved here, once: ``dest`` is then the link's
    target and ``link`` the link (see linkeddest.py)."""

    def __init__(self, dest: Path) -> None:
        dest = Path(os.path.abspath(dest))
        if dest.parent == dest:
            raise InstallError(f"cannot install into {dest}", fix="choose a subdirectory")
        self.dest, self.link = resolve(dest)
        self.root = state_root(self.dest)
        if self.link is not None:
            adopt_state_beside_link(self.link, self.root)
        self.state_file = self.root / "state.json"
        self.manifests = self.root / "manifests"
        self.store_dir = self.root / "store"
        self.stage = self.root / "stage"
        self.journal = self.root / "stage.journal"
        self.old = self.root / "old"
        self.quarantine = self.root / "quarantine"
        self.snapshot = self.root / "tree.json"

    @property
    def exists(self) -> bool:
        return self.state_file.exists()

    def create(self) -> None:
        for d in (self.root, self.manifests, self.store_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def lock(self) -> None:
        """Take the install's lock, or fail at once if another process holds it."""
        self.create()
        if not self._take_lock(self.root / "lock"):
            raise InstallLockedError(f"another p2pnode process is working on {self.dest}")

    def load(self) -> InstallState:
        if not self.state_file.exists():
            return InstallState()
        return InstallState.from_json(self.state_file.read_bytes(), self.state_file)

    def save(self, state: InstallState) -> None:
        write_atomic(self.state_file, state.to_json(), 0o600)

    def manifest_file(self, manifest_id: str) -> Path:
        return self.manifests / f"{manifest_id}.p2pm"

    def keep_manifest(self, signed: M.SignedManifest) -> None:
        path = self.manifest_file(signed.id.hex())
        if not path.exists():
            write_atomic(path, signed.encode(), 0o600)

    def load_manifest(self, manifest_id: str) -> M.Manifest:
        """A kept manifest; it was verified when installed, and is checked again for damage."""
        path = self.manifest_file(manifest_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotInstalledError(
                f"manifest {manifest_id[:16]} is not kept in {self.root}"
            ) from exc
        signed = M.parse_signed(data, source=str(path))
        if signed.id.hex() != manifest_id:
            raise InstallError(f"kept manifest {path} is damaged", fix="install again")
        return signed.manifest

    def load_signed(self, manifest_id: str) -> M.SignedManifest:
        return M.parse_signed(self.manifest_file(manifest_id).read_bytes())
