"""Each stored build's release metadata (update type, notes), for the feed and the dashboard.

The metadata is signed into the manifest (format 2, :mod:`p2pnode.release.metadata`), and the
registry already keeps every manifest byte for byte; so the tracker reads it from there instead
of keeping a second copy in its stores. That needs no schema change in either registry (SQLite
or Redis), holds for builds published before the tracker knew the fields, and cannot disagree
with what nodes verify. A manifest never changes under its id, so what was read is cached for
good: the publish that stores a manifest also fills the cache, and another replica (or this one
after a restart) parses each build's manifest once, in a worker thread, on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pnode.discovery.tracker_api import ChannelHead
from p2pnode.errors import P2PNodeError
from p2pnode.release.manifest import parse_signed
from p2pnode.release.metadata import ReleaseInfo

from .backend import RegistryStore
from .lru import LRU

__all__ = ["ReleaseInfos"]


class ReleaseInfos:
    """Manifest id -> :class:`ReleaseInfo`, read from the registry's manifests and cached.

    Args:
        registry: where the signed manifests are.
        registry_call: runs a registry call (in a worker thread when it may block).
        max_entries: builds remembered; notes are at most 16 KiB, so 1024 bound it to 16 MiB.
    """

    def __init__(
        self,
        registry: RegistryStore,
        registry_call: Callable[..., Awaitable[Any]],
        max_entries: int = 1024,
    ) -> None:
        self.registry, self.registry_call = registry, registry_call
        self._cache = LRU(max_entries)
        #: manifests parsed to learn their metadata (a cache miss each)
        self.parsed = 0

    def put(self, manifest_id: bytes, info: ReleaseInfo) -> None:
        """Remember a build's metadata (the publish that stores it knows it already)."""
        self._cache.put(manifest_id, info)

    async def get(self, manifest_id: bytes) -> ReleaseInfo:
        """The build's metadata; empty when the registry does not hold its manifest."""
        info: ReleaseInfo | None = self._cache.get(manifest_id)
        if info is not None:
            return info
        raw = await self.registry_call(self.registry.get_manifest, manifest_id)
        info = ReleaseInfo() if raw is None else await trio.to_thread.run_sync(_read, raw)
        self.parsed += 1
        self.put(manifest_id, info)
        return info

    async def head(self, head: ChannelHead) -> ChannelHead:
        """``head`` with its build's update type and notes filled in."""
        info = await self.get(head.manifest_id)
        return dataclasses.replace(head, update_type=info.update_type, notes=info.notes)

    async def fields(self, manifest_id: bytes, *, notes: bool = True) -> dict[str, Any]:
        """The JSON fields a release record gains: ``update_type`` (and ``notes``)."""
        info = await self.get(manifest_id)
        out: dict[str, Any] = {"update_type": info.update_type}
        if notes:
            out["notes"] = info.notes
        return out


def _read(raw: bytes) -> ReleaseInfo:
    try:
        return parse_signed(raw, source="stored manifest").manifest.info
    except P2PNodeError:
        # Verified when it was published: only a manifest this tracker's code cannot read (a
        # newer format, published through a newer replica) gets here; its head still serves.
        return ReleaseInfo()
