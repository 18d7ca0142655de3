"""What an install, update, rollback or repair did: the figures every report is made from.

One record serves the command line's summary, ``--json`` (``render.install_json``), the
tracker's completion announce and peer-quality report (``tracking``), and the running
``left``/``from_peers`` figures discovery announces while the install is under way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..release import manifest as M

if TYPE_CHECKING:
    from ..swarm.node import PeerStats

__all__ = ["InstallResult", "MirrorFigures", "add_mirror_stats"]

#: One mirror's counters (``cdn.fetcher.MirrorStats`` as a dict), summed over an install's
#: CDN fetches; ``faults`` nests a dict of failure kind -> count.
MirrorFigures = dict[str, Any]


@dataclass
class InstallResult:
    action: str  # installed | updated | reinstalled | unchanged | repaired | rolled-back | repair
    manifest: M.Manifest
    previous_build: int | None
    bytes_total: int
    previous_id: bytes | None = None  # manifest id of the build this one replaced
    bytes_cdn: int = 0  # bytes read from the CDN (including any that failed verification)
    bytes_reused: int = 0  # chunk bytes copied from local files or the store
    bytes_resumed: int = 0  # chunk bytes already staged by an interrupted run
    bytes_peers: int = 0  # verified chunk bytes received from peers
    seconds: float = 0.0
    mirrors: dict[str, MirrorFigures] = field(default_factory=dict)
    peers: dict[str, PeerStats] = field(default_factory=dict)  # address -> what it gave us
    listen_port: int | None = None  # where this node serves chunks, with --listen
    discovery: dict[str, Any] | None = None  # which peer source answered first, and how each did
    kept_user_files: int = 0  # the user's files carried into the new tree (disk/userfiles.py)
    displaced: dict[str, str] = field(default_factory=dict)  # user path -> where it moved
    not_kept: list[str] = field(default_factory=list)  # user paths the build's nokeep names
    repaired: list[str] = field(default_factory=list)  # files healed in an "unchanged" install
    bytes_patches: int = 0  # delta patch bytes fetched, from peers and the CDN (node/patching.py)
    bytes_patches_peers: int = 0  # of those, from peers
    bytes_patched: int = 0  # chunk bytes staged from patches (what the patches made)
    patches_applied: int = 0
    patches_failed: int = 0  # patches dropped (unfetchable, corrupt, wrong base): chunks instead
    patched: set[bytes] = field(default_factory=set)  # chunk ids staged from patches
    #: release path -> how its bytes came: "patch" (some from a patch), "chunks" (some
    #: fetched as chunks), "reused" (all already on this machine)
    methods: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Whether the install is done (its action is set): nothing is left to fetch."""
        return bool(self.action)

    def bytes_left(self) -> int:
        """What the install still has to get, for tracker announces while it runs."""
        if self.finished:
            return 0
        got = self.bytes_peers + self.bytes_cdn + self.bytes_reused + self.bytes_resumed
        return max(0, self.bytes_total - got - self.bytes_patched)

    @property
    def from_peers(self) -> int:
        """Bytes received from peers, chunks and patches: the tracker's ``from_peers``."""
        return self.bytes_peers + self.bytes_patches_peers

    @property
    def bytes_patches_cdn(self) -> int:
        """Delta patch bytes read from the CDN's patch pack (the rest came from peers)."""
        return self.bytes_patches - self.bytes_patches_peers

    @property
    def from_cdn(self) -> int:
        """Bytes read from the CDN, chunks and patches (origin egress): ``from_cdn``."""
        return self.bytes_cdn + self.bytes_patches_cdn


def add_mirror_stats(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum one CDN fetch's per-mirror figures into an install's (the swarm phase may run
    several)."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_mirror_stats(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
