"""The install directory's life on disk: open it under its lock, switch a finished stage in
atomically, finish or undo what a killed process left half done, and keep in the store what
rollback needs.

Recovery
--------
Each step is recorded in ``state.json`` (``pending``) before it starts:

``{"op": "switch", "inode": N, "from": OLD, "to": NEW, ...}``: if the install directory's inode
is N the switch happened and is completed; otherwise it did not, and the stage stays for the
next install to resume (the user's files never leave the live tree before the exchange).

``{"op": "carry", "from": OLD, "stamp": S}``: the new tree is in place and the old one is in
``old/``; the user's entries still in ``old/`` are carried into the new tree
(``userfiles.carry``: one rename each, so what is left in ``old/`` is what is left to do, and
running it again finishes it). Only then is the new tree's snapshot taken and the next step
recorded.

``{"op": "harvest"}``: harvest again (it is idempotent); ``old/`` then holds only files the
old build shipped, and is deleted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..errors import (
    DiskSpaceError,
    InstallError,
    NoRollbackError,
    NotInstalledError,
    P2PNodeError,
)
from ..release import manifest as M
from . import snapshot
from .fsutil import exchange, fsync_dir
from .linkeddest import unpark_link
from .stage import Journal, LocalChunks, Stage, read_verified
from .state import InstallState, StateDir
from .store import ChunkStore
from .userfiles import Carried, carry, stamp

__all__ = [
    "check_space",
    "harvest",
    "installed",
    "kept_offline",
    "local_chunks",
    "recover",
    "refuse_foreign_directory",
    "rollback_target",
    "switch",
]


@asynccontextmanager
async def installed(dest: Path) -> AsyncIterator[tuple[StateDir, InstallState, M.Manifest]]:
    """Lock the install at ``dest``, finish any interrupted switch, and give its state and
    current manifest; for operations on an existing install (rollback, verify, repair)."""
    sd = StateDir(dest)
    if not sd.exists:
        raise NotInstalledError(f"nothing is installed in {dest}")
    with sd:
        state = sd.load()
        await trio.to_thread.run_sync(recover, sd, state)
        if not state.current:
            raise NotInstalledError(f"nothing is installed in {dest}")
        yield sd, state, sd.load_manifest(state.current)


def local_chunks(sd: StateDir, state: InstallState) -> LocalChunks:
    """Every chunk this install can serve: the current tree, the store (kept versions) and the
    verified part of an unfinished stage. What the swarm serves from, and offers to the swarms
    of other builds of the app."""
    local = LocalChunks(ChunkStore(sd.store_dir))
    if state.current:
        local.add_tree(sd.dest, sd.load_manifest(state.current))
    target = Journal.target_of(sd.journal)
    if target is not None and sd.manifest_file(target.hex()).exists():
        staged = sd.load_manifest(target.hex())
        local.add_stage(Stage(sd.stage, staged, staged.files), Journal.read_done(sd.journal))
    return local


def refuse_foreign_directory(sd: StateDir) -> None:
    if sd.exists or not sd.dest.exists():
        return
    if not sd.dest.is_dir() or any(sd.dest.iterdir()):
        raise InstallError(
            f"{sd.dest} exists and is not a p2pnode install",
            fix="install into a new or empty directory",
        )


#: Free space left over after staging, for the state files, the journal and the switch.
SPACE_RESERVE = 64 * 2**20


def check_space(root: Path, stage: Stage, needed: dict[bytes, int]) -> None:
    want = sum(len(stage.locations[cid]) * n for cid, n in needed.items())
    free = shutil.disk_usage(root).free
    if want + SPACE_RESERVE > free:
        # State the whole requirement: "needs 40 MiB, has 99 MiB free" read as a bug.
        raise DiskSpaceError(
            f"staging needs {_mib(want + SPACE_RESERVE)} MiB free ({_mib(want)} MiB of files "
            f"plus a {_mib(SPACE_RESERVE)} MiB reserve), but {root.parent} has "
            f"{free // 2**20} MiB free",
            fix=f"free at least {_mib(want + SPACE_RESERVE - free)} MiB there, or install "
            "elsewhere",
        )


def _mib(n: int) -> int:
    """Whole MiB, rounded up: a requirement is never understated."""
    return -(-n // 2**20)


def switch(
    sd: StateDir,
    state: InstallState,
    signed: M.SignedManifest,
    history_after: list[str],
    keep_versions: int,
) -> Carried:
    """Put the finished stage in place of the install directory, carry the user's files of
    the old tree into it, and harvest the old tree (each step recorded; see Recovery)."""
    new_id = signed.id.hex()
    sd.keep_manifest(signed)
    state.pending = {
        "op": "switch",
        "from": state.current,
        "to": new_id,
        "inode": os.stat(sd.stage).st_ino,
        "history": [h for h in history_after if h != new_id][:keep_versions],
        "stamp": stamp(),
    }
    sd.save(state)
    unpark_link(sd.old, sd.root)
    shutil.rmtree(sd.old, ignore_errors=True)
    if not sd.dest.exists():
        os.rename(sd.stage, sd.dest)
    elif exchange(sd.stage, sd.dest):
        os.rename(sd.stage, sd.old)
    else:  # no atomic exchange here: two renames, bridged by recover()
        os.rename(sd.dest, sd.old)
        os.rename(sd.stage, sd.dest)
    fsync_dir(sd.dest.parent)
    fsync_dir(sd.root)
    sd.journal.unlink(missing_ok=True)
    return _complete_switch(sd, state)


def _complete_switch(sd: StateDir, state: InstallState) -> Carried:
    p = state.pending or {}
    state.current = p["to"]
    state.history = list(p["history"])
    state.pending = {"op": "carry", "from": p.get("from"), "stamp": p.get("stamp") or stamp()}
    sd.save(state)
    return _carry(sd, state)


def _carry(sd: StateDir, state: InstallState) -> Carried:
    p = state.pending or {}
    assert state.current is not None
    target = sd.load_manifest(state.current)
    try:
        # Unknown (a record from before carrying existed, or a lost manifest): then nothing
        # in the old tree counts as ours, and every file not in the new build is kept.
        shipped = sd.load_manifest(p["from"]) if p.get("from") else None
    except P2PNodeError:
        shipped = None
    try:
        carried = carry(
            sd.old, sd.dest, shipped, target, str(p.get("stamp") or stamp()), sd.quarantine
        )
    except OSError as exc:
        raise InstallError(
            f"could not carry your own files from {sd.old} into {sd.dest}: {exc}",
            fix=f"they are safe in {sd.old}; fix the cause and run the command again",
        ) from exc
    snapshot.record(sd, target)
    state.pending = {"op": "harvest"}
    sd.save(state)
    harvest(sd, state)
    return carried


def recover(sd: StateDir, state: InstallState) -> None:
    """Finish or undo whatever a killed process left half done (see module docstring)."""
    unpark_link(sd.old, sd.root)
    p = state.pending
    if not p:
        if sd.old.exists():
            shutil.rmtree(sd.old, ignore_errors=True)
        return
    if p.get("op") == "switch":
        if sd.dest.exists() and os.stat(sd.dest).st_ino == p["inode"]:
            if sd.stage.exists() and not sd.old.exists():
                os.rename(sd.stage, sd.old)  # killed right after the exchange
            _complete_switch(sd, state)
            return
        if not sd.dest.exists() and sd.stage.exists():
            # Killed between the two renames of the non-atomic fallback.
            os.rename(sd.stage, sd.dest)
            _complete_switch(sd, state)
            return
        state.pending = None  # the switch never happened; the stage resumes next time
        sd.save(state)
        return
    if p.get("op") == "carry":
        _carry(sd, state)
    elif p.get("op") == "harvest":
        harvest(sd, state)


def harvest(sd: StateDir, state: InstallState) -> None:
    """Keep in the store what kept versions need beyond the current tree; drop the rest."""
    current = sd.load_manifest(state.current) if state.current else None
    in_tree = set(current.unique_chunks()) if current else set()
    keep: set[bytes] = set()
    kept_manifests = []
    for mid in state.history:
        try:
            kept_manifests.append(sd.load_manifest(mid))
        except P2PNodeError:
            continue
    store = ChunkStore(sd.store_dir)
    for m in kept_manifests:
        for f, c in m.iter_chunks():
            if c.id in in_tree or c.id in keep:
                continue
            keep.add(c.id)
            if c.id in store or not sd.old.exists():
                continue
            data = read_verified(sd.old / f.path, c.offset, c.length, c.id)
            if data is not None:
                store.put(c.id, data)
    store.sync()
    shutil.rmtree(sd.old, ignore_errors=True)
    if current is not None:  # patches it fetched: served to peers while it is installed
        keep.update(p.id for p in current.patches if p.id in store)
    store.retain(keep)
    wanted = {f"{mid}.p2pm" for mid in [state.current, *state.history] if mid}
    for kept in sd.manifests.iterdir():
        if kept.name not in wanted:
            kept.unlink(missing_ok=True)
    state.pending = None
    sd.save(state)


def rollback_target(
    state: InstallState, builds: dict[str, int], current: int, to: int | None
) -> str:
    """The kept version a rollback goes to: build ``to``, or the newest kept build older than
    the installed one (so rolling back twice goes further back, never forth again)."""
    if to is not None:
        for mid in state.history:
            if builds.get(mid) == to:
                return mid
        kept = ", ".join(str(b) for b in sorted(builds.values(), reverse=True)) or "none"
        raise NoRollbackError(
            f"build {to} is not kept for {state.app} (kept builds: {kept})",
            fix="pick one of the kept builds (`p2pnode status --dest DIR`)",
        )
    older = [mid for mid in state.history if builds.get(mid, current) < current]
    if not older:
        raise NoRollbackError(
            f"no build older than the installed build {current} is kept",
            fix="`p2pnode status --dest DIR` lists kept builds; go to one with --to BUILD",
        )
    return max(older, key=lambda mid: builds[mid])


def kept_offline(sd: StateDir, state: InstallState, manifest_id: str) -> bool:
    """Whether a kept version can be rolled back to without the network: every chunk of it
    is in the installed build (if its tree holds it) or in the store."""
    try:
        kept = sd.load_manifest(manifest_id)
        current = sd.load_manifest(state.current) if state.current else None
    except P2PNodeError:
        return False
    in_tree = set(current.unique_chunks()) if current and sd.dest.is_dir() else set()
    store = ChunkStore(sd.store_dir)
    return all(cid in in_tree or cid in store for cid in kept.unique_chunks())
