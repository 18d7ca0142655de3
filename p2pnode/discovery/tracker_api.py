"""The tracker's wire types, shared by the client (``discovery.tracker``) and the server
(the ``tracker`` package): one definition of each, so the two cannot drift apart.

The HTTP contract is docs/tracker-api.md. Announces and reports are JSON bodies signed
verbatim: ``keys.sign(node_key, DOMAIN, body)``, the signature as 128 hex digits in
``SIGNATURE_HEADER``. The domain tags differ per message type, so an announce signature can
never be replayed as a report, a manifest or a DHT record. The tracker may answer an announce
with a session token the node sends back in ``SESSION_HEADER`` (it spares a signature check).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..release import keys
from ..release.metadata import MAX_NOTES_BYTES, UpdateType

__all__ = [
    "ANNOUNCE_DOMAIN",
    "CLIENT_FIELD",
    "CLIENT_PATTERN",
    "KEY_CHAIN_PATTERN",
    "OUTCOME_CODES",
    "OUTCOME_DOMAIN",
    "OUTCOME_KINDS",
    "OUTCOME_SPLIT_FIELDS",
    "REPORT_DOMAIN",
    "SESSION_HEADER",
    "SIGNATURE_HEADER",
    "ChannelHead",
    "TrackerPeer",
    "sign_body",
]

ANNOUNCE_DOMAIN = b"p2pnode-tracker-announce-v1"
REPORT_DOMAIN = b"p2pnode-tracker-report-v1"
OUTCOME_DOMAIN = b"p2pnode-tracker-outcome-v1"
#: What a node did to its install, as ``POST /v1/outcomes`` names it.
OUTCOME_KINDS = ("install", "update", "repair", "rollback")
#: Why an install failed: stable codes (operators alert on them), derived on the node from its
#: error tree (``node.tracking.outcome_code``); the tracker refuses any other.
OUTCOME_CODES = (
    "download_failed",  # every mirror and peer failed for some chunk
    "network_timeout",
    "network_error",
    "tracker_unreachable",
    "peer_protocol_error",
    "insufficient_storage",
    "permission_denied",
    "corrupted_download",  # bytes that do not hash to their chunk id
    "integrity_check_failed",  # a trust check of the manifest or the tree failed
    "signature_invalid",
    "manifest_expired",
    "manifest_invalid",
    "downgrade_refused",
    "client_too_old",  # the build's min_client is newer than the node (release.compat)
    "platform_unsupported",  # the build is for other platforms
    "install_locked",
    "rollback_failed",
    "install_failed",  # another local-state problem
    "other",
)
SIGNATURE_HEADER = "X-P2PNode-Signature"
#: Optional announce field: the node's p2pnode version (``p2pnode.__version__``), for the
#: tracker's fleet view. A tracker that accepts it lists it in its answers' ``announce_fields``;
#: a node sends it only after seeing that, because trackers older than the field refuse unknown
#: fields (their parser is strict), and a tracker never requires it (older nodes omit it).
CLIENT_FIELD = "client"
#: Optional outcome fields: how many of an attempt's ``bytes_patches`` came from the CDN and
#: from peers (those bytes are also in its ``bytes_cdn`` / ``bytes_peers``). A tracker that
#: accepts them lists them in its announce answers' ``outcome_fields``; a node sends them only
#: after seeing that (older trackers refuse unknown fields), and without them a tracker counts
#: the attempt's patches as not split by source.
OUTCOME_SPLIT_FIELDS = ("bytes_patches_cdn", "bytes_patches_peers")
#: A version as PEP 440 and local builds spell it, at most 32 characters.
CLIENT_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z.+!_-]{0,31}$"
#: Header carrying an announce session token (the tracker's ``AnnounceSessions``).
SESSION_HEADER = "X-P2PNode-Session"
#: A head's ``key_chain``: ``rotation.chain_digest`` of the app's rotations document.
KEY_CHAIN_PATTERN = r"^[0-9a-f]{32}$"


def sign_body(key: Ed25519PrivateKey, domain: bytes, fields: dict[str, Any]) -> tuple[bytes, str]:
    """Serialise ``fields`` plus key, ts and nonce; return (body, signature hex)."""
    obj = dict(fields)
    obj["key"] = keys.format_public_key(keys.public_key_bytes(key))
    obj["ts"] = int(time.time())
    obj["nonce"] = os.urandom(12).hex()
    body = json.dumps(obj, separators=(",", ":")).encode()
    return body, keys.sign(key, domain, body).hex()


@dataclass(frozen=True, slots=True)
class ChannelHead:
    """Where a channel points: the head of ``GET /v1/apps/APP/channels/CH`` and of the
    update feed. ``seq`` grows with every move of any channel of the tracker."""

    app: str
    channel: str
    seq: int
    manifest_id: bytes
    build: int
    version: str
    #: when the channel last moved (tracker clock, Unix seconds)
    updated: float = 0.0
    #: The build's update type and release notes as its signed manifest states them (format 2;
    #: ``None`` and "" for a manifest without them, or from a tracker older than the fields).
    #: The tracker's word: good for ordering a queue before the manifest is fetched; the
    #: manifest, once verified, is what counts.
    update_type: UpdateType | None = None
    notes: str = ""
    #: The app's publisher key rotations, named by the digest of its rotations document
    #: (``release.rotation.chain_digest``); ``None``: it has none (or an older tracker, or not
    #: a feed answer). A node whose last document differs fetches the chain and follows it from
    #: its pinned keys (node/rotations.py): how a node that never meets a new key's build
    #: still learns its old key retired.
    key_chain: str | None = None

    @property
    def critical(self) -> bool:
        """The build is a critical update: the client service queues it first."""
        return self.update_type is UpdateType.CRITICAL

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "channel": self.channel,
            "seq": self.seq,
            "manifest_id": self.manifest_id.hex(),
            "build": self.build,
            "version": self.version,
            "updated": self.updated,
            "manifest_url": f"/v1/manifests/{self.manifest_id.hex()}",
            "update_type": self.update_type,
            "notes": self.notes,
        } | ({} if self.key_chain is None else {"key_chain": self.key_chain})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChannelHead:
        return cls(
            app=d["app"],
            channel=d["channel"],
            seq=int(d["seq"]),
            manifest_id=bytes.fromhex(d["manifest_id"]),
            build=int(d["build"]),
            version=d["version"],
            updated=float(d.get("updated", 0.0)),
            update_type=_update_type(d.get("update_type")),
            notes=d["notes"][:MAX_NOTES_BYTES] if isinstance(d.get("notes"), str) else "",
            key_chain=_key_chain(d.get("key_chain")),
        )


def _key_chain(value: Any) -> str | None:
    """A head's chain digest; anything else (none, a malformed one) names no chain."""
    return value if isinstance(value, str) and re.fullmatch(KEY_CHAIN_PATTERN, value) else None


def _update_type(value: Any) -> UpdateType | None:
    """A head's update type; an unknown one (a newer tracker's) is an ordinary update."""
    try:
        return UpdateType(value) if isinstance(value, str) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class TrackerPeer:
    """One peer of an announce answer. The tracker renders these straight to bytes on its hot
    path (``tracker.swarm``, ``tracker.swarm_redis``); :meth:`to_json` is the reference."""

    node_id: bytes
    public_key: bytes
    ip: str
    port: int
    manifest: bytes
    seed: bool
    progress: float
    score: float
    records: tuple[bytes, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id.hex(),
            "key": keys.format_public_key(self.public_key),
            "ip": self.ip,
            "port": self.port,
            "manifest": self.manifest.hex(),
            "seed": self.seed,
            "progress": round(self.progress, 4),
            "score": round(self.score, 4),
        }
        if self.records:
            out["records"] = [r.hex() for r in self.records]
        return out

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> TrackerPeer:
        return cls(
            node_id=bytes.fromhex(p["node_id"]),
            public_key=keys.parse_public_key(p["key"]),
            ip=p["ip"],
            port=int(p["port"]),
            manifest=bytes.fromhex(p["manifest"]),
            seed=bool(p["seed"]),
            progress=float(p["progress"]),
            score=float(p["score"]),
            records=tuple(bytes.fromhex(r) for r in p.get("records", [])),
        )
