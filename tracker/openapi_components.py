"""The components of the OpenAPI description (:mod:`tracker.openapi`): the schemas of the
bodies nodes, publishers and operators send and get back, bounded by the same constants the
handlers check."""

from __future__ import annotations

from typing import Any

from p2pnode.discovery.tracker_api import (
    CLIENT_PATTERN,
    KEY_CHAIN_PATTERN,
    OUTCOME_CODES,
    OUTCOME_KINDS,
)
from p2pnode.release.metadata import MAX_NOTES_BYTES, UpdateType

from . import core
from .load_openapi import load_schemas
from .openapi_parts import _HEX64, _JSON, _KEY, _NAME, _NONCE, _TS, _bounded, _range, _ref
from .operations import MAX_MIN_OUTCOMES, PERCENT_RANGE, THRESHOLD_RANGE
from .outcomes import MAX_BUILD, MAX_DURATION_MS
from .rollout import ACTIONS, STATES


def _schemas() -> dict[str, Any]:
    count = _bounded(core.MAX_BYTES)
    build = _bounded(MAX_BUILD)
    #: what every signed node message carries, and the build an announce or outcome is about
    about_build = {"key": _KEY, "ts": _TS, "nonce": _NONCE, "app": _NAME, "manifest": _HEX64}
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message", "fix"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "fix": {"type": "string"},
            },
        },
        "NewApp": {
            "type": "object",
            "required": ["app", "key"],
            "properties": {"app": _NAME, "key": _KEY},
        },
        "Promote": {
            "type": "object",
            "required": ["manifest_id"],
            "properties": {"manifest_id": _HEX64},
        },
        "Rollback": {
            "type": "object",
            "description": "without manifest_id (or without a body): back to the previous build",
            "properties": {"manifest_id": _HEX64},
        },
        "Head": {
            "type": "object",
            "additionalProperties": False,
            "required": ["app", "channel", "seq", "manifest_id", "build", "version"],
            "properties": {
                "app": _NAME,
                "channel": _NAME,
                "seq": {"type": "integer"},
                "manifest_id": _HEX64,
                "build": {"type": "integer"},
                "version": {"type": "string"},
                "updated": {"type": "number"},
                "manifest_url": {"type": "string"},
                "update_type": {
                    "enum": [*(t.value for t in UpdateType), None],
                    "description": "as the build's signed manifest states it; null: none "
                    "(an ordinary update). `critical` is queued first by client services",
                },
                "notes": {
                    "type": "string",
                    "maxLength": MAX_NOTES_BYTES,
                    "description": "the build's release notes (UTF-8, at most "
                    f"{MAX_NOTES_BYTES} bytes); empty when it has none",
                },
                "key_chain": {
                    "type": "string",
                    "pattern": KEY_CHAIN_PATTERN,
                    "description": "feed answers, for an app whose signing key was rotated: "
                    "the digest of its rotations document (GET /v1/apps/{app}/rotations); a "
                    "node whose last document differs fetches it again. A long poll also "
                    "answers early when it changes",
                },
                "rollout": {
                    "type": "object",
                    "description": "the channel's staged rollout, when the feed was asked "
                    "with ?node=: whether this node is in it",
                    "properties": {
                        "build": {"type": "integer"},
                        "percent": {"type": "number"},
                        "state": {"enum": list(STATES)},
                        "member": {"type": "boolean"},
                    },
                },
            },
        },
        "ReleaseEvent": {
            "type": "object",
            "description": "one event of the stream (the schema of a text/event-stream answer "
            "describes each event): `data` is the channel's new head as JSON",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"const": "release"},
                "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the head's seq"},
                "data": {
                    "type": "string",
                    "contentMediaType": _JSON,
                    "contentSchema": _ref("Head"),
                },
                "retry": {"type": "integer"},
            },
        },
        "AuditPage": {
            "type": "object",
            "required": ["entries", "next_before"],
            "properties": {
                "entries": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["seq", "at", "action", "actor", "token_id", "address"],
                        "properties": {
                            "seq": {"type": "integer"},
                            "at": {"type": "number"},
                            "action": {"type": "string"},
                            "actor": {"type": "string"},
                            "token_id": {
                                "type": "string",
                                "description": "admin, or t-<8 hex of the token's hash>; "
                                "never the token",
                            },
                            "address": {"type": "string"},
                            "target": {"type": "string"},
                            "detail": {"type": "object"},
                        },
                    },
                },
                "next_before": {
                    "type": ["integer", "null"],
                    "description": "pass as before for the next (older) page; null: no more",
                },
            },
        },
        "RolloutChange": {
            "type": "object",
            "additionalProperties": False,
            "required": ["action"],
            "properties": {
                "action": {"enum": list(ACTIONS)},
                "percent": _range(*PERCENT_RANGE),
                "threshold": _range(*THRESHOLD_RANGE),
                "min_outcomes": {"type": "integer", "minimum": 1, "maximum": MAX_MIN_OUTCOMES},
            },
        },
        "Rollout": {
            "type": "object",
            "required": ["app", "channel", "manifest", "build", "previous", "percent", "state"],
            "properties": {
                "app": _NAME,
                "channel": _NAME,
                "manifest": _HEX64,
                "build": {"type": "integer"},
                "previous": _HEX64,
                "percent": {"type": "number"},
                "state": {"enum": list(STATES)},
                "threshold": {"type": "number"},
                "min_outcomes": {"type": "integer"},
                "success": {"type": "integer"},
                "failure": {"type": "integer"},
                "failure_rate": {"type": ["number", "null"]},
                "started": {"type": "number"},
                "changed": {"type": "number"},
                "reason": {"type": "string"},
                "epoch": {"type": "integer", "minimum": 0},
            },
        },
        "Announce": {
            "type": "object",
            "additionalProperties": False,
            "required": ["key", "ts", "nonce", "app", "manifest", "port"],
            "properties": {
                **about_build,
                "port": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": core.MAX_PORT,
                    "description": "0: the node does not serve (counted, never handed out)",
                },
                "ip": {"type": "string"},
                "event": {"enum": list(core.EVENTS)},
                "size": count,
                "left": count,
                "from_peers": count,
                "from_cdn": count,
                "uploaded": count,
                "numwant": _bounded(core.MAX_NUMWANT),
                "records": {
                    "type": "array",
                    "maxItems": core.MAX_RECORDS,
                    "items": {"type": "string", "maxLength": core.MAX_RECORD_HEX},
                },
                "client": {
                    "type": "string",
                    "pattern": CLIENT_PATTERN,
                    "description": "the node's p2pnode version, for the fleet view; send it "
                    "only to a tracker whose answers list it in announce_fields",
                },
            },
        },
        "Outcome": {
            "type": "object",
            "additionalProperties": False,
            "required": ["key", "ts", "nonce", "app", "manifest", "kind", "outcome", "to_build"],
            "properties": {
                **about_build,
                "kind": {"enum": list(OUTCOME_KINDS)},
                "outcome": {"enum": ["success", "failure"]},
                "code": {"enum": list(OUTCOME_CODES)},
                "duration_ms": _bounded(MAX_DURATION_MS),
                "from_build": build,
                "to_build": build,
                "bytes_peers": {**count, "description": "from peers: chunks and delta patches"},
                "bytes_cdn": {**count, "description": "from the CDN: chunks and delta patches"},
                "bytes_reused": count,
                "bytes_patches": {**count, "description": "delta patch bytes, from either source"},
                "bytes_patches_cdn": {
                    **count,
                    "description": "of bytes_patches, those from the CDN (also in bytes_cdn); "
                    "send it only to a tracker whose announce answers list it in "
                    "outcome_fields (absent: 0, the patches not split by source)",
                },
                "bytes_patches_peers": {
                    **count,
                    "description": "of bytes_patches, those from peers (also in bytes_peers); "
                    "as bytes_patches_cdn",
                },
            },
        },
        "Report": {
            "type": "object",
            "additionalProperties": False,
            "required": ["key", "ts", "nonce", "peers"],
            "properties": {
                "key": _KEY,
                "ts": _TS,
                "nonce": _NONCE,
                "peers": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": core.MAX_REPORT_PEERS,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["node_id"],
                        "properties": {
                            "node_id": {"type": "string", "pattern": core.HEX40_PATTERN},
                            "bytes": count,
                            "rate": _bounded(core.MAX_RATE),
                            "failures": _bounded(core.MAX_COUNT),
                            "corrupt": _bounded(core.MAX_COUNT),
                        },
                    },
                },
            },
        },
        **_fleet_schemas(),
        **load_schemas(),
    }


def _fleet_schemas() -> dict[str, Any]:
    """The fleet view's answers (tracker.fleet)."""
    outcome = {
        "type": "object",
        "required": ["kind", "outcome", "code", "to_build", "at"],
        "properties": {
            "app": _NAME,
            "manifest_id": _HEX64,
            "kind": {"enum": list(OUTCOME_KINDS)},
            "outcome": {"enum": ["success", "failure"]},
            "code": {"enum": [*OUTCOME_CODES, None]},
            "from_build": {"type": ["integer", "null"]},
            "to_build": {"type": "integer"},
            "at": {"type": "number"},
        },
    }
    return {
        "Fleet": {
            "type": "object",
            "required": ["app", "nodes", "updating", "builds", "clients"],
            "properties": {
                "app": _NAME,
                "nodes": {"type": "integer", "description": "nodes seen within ttl_s"},
                "updating": {
                    "type": "integer",
                    "description": "nodes seen downloading whose running build is not known",
                },
                "ttl_s": {"type": "number"},
                "bucket_s": {"type": "integer"},
                "builds": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["manifest_id", "build", "nodes", "share", "adoption"],
                        "properties": {
                            "manifest_id": _HEX64,
                            "build": {"type": "integer"},
                            "version": {"type": ["string", "null"]},
                            "nodes": {"type": "integer"},
                            "share": {"type": "number"},
                            "last_seen": {"type": "number"},
                            "adoption": {
                                "type": "array",
                                "description": "[bucket start (Unix s), nodes running it]",
                                "items": {
                                    "type": "array",
                                    "items": {"type": "number"},
                                    "minItems": 2,
                                    "maxItems": 2,
                                },
                            },
                        },
                    },
                },
                "clients": {
                    "type": "object",
                    "description": "nodes per p2pnode client version ('unknown': too old to say)",
                    "additionalProperties": {"type": "integer"},
                },
                "joined": {
                    "type": "array",
                    "description": "[bucket start (Unix s), nodes first seen still downloading "
                    "so far], sampled per bucket, ending with now: the rate nodes join at",
                    "items": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
            },
        },
        "FleetNode": {
            "type": "object",
            "required": ["node_id", "apps", "recent_outcomes"],
            "properties": {
                "node_id": {"type": "string", "pattern": core.HEX40_PATTERN},
                "apps": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["app", "manifest_id", "build", "client", "last_seen"],
                        "properties": {
                            "app": _NAME,
                            "manifest_id": {"oneOf": [_HEX64, {"type": "null"}]},
                            "build": {"type": ["integer", "null"]},
                            "client": {"type": "string"},
                            "last_seen": {"type": "number"},
                            "expires": {"type": "number"},
                            "last_outcome": {"oneOf": [outcome, {"type": "null"}]},
                        },
                    },
                },
                "recent_outcomes": {"type": "array", "items": outcome},
            },
        },
    }
