"""The rows of the in-memory swarm (:mod:`tracker.swarm`): members, one swarm's member list,
the changes the SQLite write-behind takes, and a member's JSON fragment in answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pnode.discovery.dht.records import PeerRecordError, decode_bundle
from p2pnode.release import keys

__all__ = ["Dirty", "Member", "SwarmMembers", "member_fragment"]

_FRAG = (
    b'{"node_id":"%s","key":"%s","ip":"%s","port":%d,"manifest":"%s","seed":%s,'
    b'"progress":%s,"score":%s%s}'
)


class Member:
    """One live swarm member (a node in the swarm of one manifest)."""

    __slots__ = (
        "app",
        "expires",
        "frag",
        "from_cdn",
        "from_peers",
        "ip",
        "key",
        "left",
        "manifest",
        "node",
        "port",
        "record",
        "size",
        "uploaded",
    )

    def __init__(
        self,
        manifest: bytes,
        node: bytes,
        app: str,
        key: bytes,
        ip: str,
        port: int,
        size: int,
        left: int,
        from_peers: int,
        from_cdn: int,
        uploaded: int,
        expires: float,
        record: bytes | None,
    ) -> None:
        self.manifest, self.node, self.app, self.key = manifest, node, app, key
        self.ip, self.port, self.size, self.left = ip, port, size, left
        self.from_peers, self.from_cdn, self.uploaded = from_peers, from_cdn, uploaded
        self.expires, self.record = expires, record
        self.frag: bytes | None = None

    def row(self) -> tuple[Any, ...]:
        """The ``peers`` table row (tracker.swarm_sqlite's schema)."""
        return (
            self.manifest,
            self.node,
            self.app,
            self.key,
            self.ip,
            self.port,
            self.size,
            self.left,
            self.from_peers,
            self.from_cdn,
            self.uploaded,
            self.expires,
            self.record,
        )


class SwarmMembers:
    """The members of one manifest's swarm, and its cached ranking (see tracker.swarm)."""

    __slots__ = (
        "app",
        "manifest",
        "members",
        "ranked",
        "ranked_at",
        "seeds",
        "stale",
        "top",
        "top_of",
        "top_until",
    )

    def __init__(self, manifest: bytes, app: str) -> None:
        self.manifest, self.app = manifest, app
        #: node id -> member, in expiry order (oldest first)
        self.members: dict[bytes, Member] = {}
        self.seeds = 0
        #: members sorted for answers; None = re-sort before the next read
        self.ranked: list[Member] | None = None
        self.ranked_at = 0.0
        #: a member's ``left`` changed since the sort
        self.stale = False
        #: the first TOP servable members of ``top_of`` (valid while it is ``ranked``, until
        #: ``top_until``; None = walk the list again)
        self.top: list[Member] | None = None
        self.top_of: list[Member] | None = None
        self.top_until = 0.0


@dataclass
class Dirty:
    """Changes since the last :meth:`MemorySwarm.take_dirty`, as rows for the write-behind."""

    peers_upsert: list[tuple[Any, ...]] = field(default_factory=list)
    peers_delete: list[tuple[bytes, bytes]] = field(default_factory=list)
    releases: list[tuple[Any, ...]] = field(default_factory=list)
    adoption: list[tuple[bytes, int, int]] = field(default_factory=list)
    quality_upsert: list[tuple[Any, ...]] = field(default_factory=list)
    quality_delete: list[bytes] = field(default_factory=list)
    corrupt: list[tuple[bytes, bytes]] = field(default_factory=list)
    seen: list[tuple[bytes, float]] = field(default_factory=list)
    done: list[tuple[bytes, bytes, float]] = field(default_factory=list)
    gc_before: float | None = None

    def __len__(self) -> int:
        return (
            len(self.peers_upsert)
            + len(self.peers_delete)
            + len(self.releases)
            + len(self.adoption)
            + len(self.quality_upsert)
            + len(self.quality_delete)
            + len(self.corrupt)
            + len(self.seen)
            + len(self.done)
            + (self.gc_before is not None)
        )


def member_fragment(m: Member, score: float) -> bytes:
    """The member's JSON object in answers (docs/tracker-api.md, Announce).

    Formatted directly rather than through ``json.dumps``: every value is a number, a
    boolean, hex, or an address literal (validated, or the socket's), so nothing needs
    escaping, and floats print as ``json`` prints them (``repr``)."""
    progress = 1.0 if m.size <= 0 else max(0.0, min(1.0, 1 - m.left / m.size))
    records = b""
    if m.record is not None:
        try:
            hexed = [r.hex().encode() for r in decode_bundle(m.record)]
            records = b',"records":["%s"]' % b'","'.join(hexed)
        except PeerRecordError:
            pass
    return _FRAG % (
        m.node.hex().encode(),
        keys.format_public_key(m.key).encode(),
        m.ip.encode(),
        m.port,
        m.manifest.hex().encode(),
        b"true" if m.left == 0 else b"false",
        repr(round(progress, 4)).encode(),
        repr(round(score, 4)).encode(),
        records,
    )
