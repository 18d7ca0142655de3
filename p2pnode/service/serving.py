"""The daemon's one listening swarm node: every installed build of every library entry, and the
chunks earlier builds share, served from one port under one identity.

``p2pnode seed`` serves one install; the daemon holds many, so its node's chunk index is the
union of every install's (:class:`Holdings`), and it offers the current and kept builds of every
entry. Like ``seed`` it holds no install lock (reads are verified, so an update switching a tree
meanwhile costs rejected reads, never a wrong byte) and rebuilds its index after every finished
job and every :data:`RESEED_SECONDS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..disk.stage import LocalChunks
from ..disk.state import StateDir
from ..disk.switch import local_chunks
from ..errors import P2PNodeError
from ..release import manifest as M

if TYPE_CHECKING:
    from ..swarm.node import SwarmNode

__all__ = ["RESEED_SECONDS", "Holdings", "holdings_of", "refresh"]

#: How often the served index is rebuilt from the install directories.
RESEED_SECONDS = 30.0


class Holdings(LocalChunks):
    """Several installs' chunks as one index: a chunk is had if any install has it, and read
    (verified) from the first that gives it."""

    def __init__(self, parts: Iterable[LocalChunks]) -> None:
        super().__init__(None)
        self.parts = list(parts)

    def has(self, chunk_id: bytes) -> bool:
        return any(p.has(chunk_id) for p in self.parts)

    def read(self, chunk_id: bytes) -> bytes | None:
        for p in self.parts:
            if p.has(chunk_id):
                data = p.read(chunk_id)
                if data is not None:
                    return data
        return None


def holdings_of(dests: Iterable[Path]) -> tuple[Holdings, list[tuple[M.Manifest, bytes | None]]]:
    """The chunks of every install at ``dests`` and the builds to offer (current first, with
    its signed encoding so peers holding only older builds can be shown it). An install whose
    state cannot be read is skipped (its job will say why). Blocking: call from a thread."""
    parts: list[LocalChunks] = []
    offers: list[tuple[M.Manifest, bytes | None]] = []
    for dest in dests:
        sd = StateDir(dest)
        try:
            if not sd.exists:
                continue
            state = sd.load()
            parts.append(local_chunks(sd, state))
            if state.current:
                signed = sd.load_signed(state.current)
                offers.append((signed.manifest, signed.encode()))
            offers += [(sd.load_manifest(mid), None) for mid in state.history]
        except (P2PNodeError, OSError):
            continue
    return Holdings(parts), offers


def refresh(node: SwarmNode, dests: Iterable[Path]) -> list[M.Manifest]:
    """Rebuild ``node``'s index from ``dests``; returns the builds installed now (current
    ones, for the tracker's listing). Blocking: call from a thread (the node is only assigned
    new objects, which the trio thread reads whole)."""
    local, offers = holdings_of(dests)
    current: list[M.Manifest] = []
    for manifest, signed in offers:
        if manifest.id not in node.manifests or (signed and manifest.id not in node.signed):
            node.offer(manifest, signed)
        if signed is not None:
            current.append(manifest)
    node.local = local
    return current
