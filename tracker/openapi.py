"""The OpenAPI 3.1 description served at ``/openapi.json``.

Built from the definitions the handlers validate with: name patterns, hex patterns and bounds
are imported from :mod:`tracker.core`, :mod:`tracker.outcomes`, :mod:`tracker.channels` and the
manifest's name rule, so a limit changed in the code changes here too. docs/tracker-api.md
stays the normative text; tests/tracker/test_openapi.py checks that every route appears, that
every path parameter is declared and that declared status codes are the ones the server returns.
"""

from __future__ import annotations

from typing import Any

from p2pnode.discovery.tracker_api import (
    CLIENT_PATTERN,
    KEY_CHAIN_PATTERN,
    OUTCOME_CODES,
    OUTCOME_KINDS,
    SIGNATURE_HEADER,
)
from p2pnode.release.keys import KEY_PREFIX
from p2pnode.release.manifest import NAME_PATTERN
from p2pnode.release.metadata import MAX_NOTES_BYTES, UpdateType
from p2pnode.release.rotation import MAX_ROTATIONS_BYTES

from . import core
from .channels import MAX_SINCE, MAX_WAIT
from .keyrotation import ROTATION_MEDIA, ROTATIONS_MEDIA
from .load_openapi import load_paths, load_schemas
from .operations import MAX_AUDIT_PAGE, MAX_MIN_OUTCOMES, PERCENT_RANGE, THRESHOLD_RANGE
from .outcomes import MAX_BUILD, MAX_DURATION_MS
from .rollout import ACTIONS, STATES

__all__ = ["openapi_document"]

_JSON = "application/json"
_MANIFEST = "application/x-p2pnode-manifest"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any], media: str = _JSON) -> dict[str, Any]:
    return {media: {"schema": schema}}


_ERROR = {"description": "Refused; nothing was stored", "content": _content(_ref("Error"))}
_UNAVAILABLE = {
    "description": "A store behind the tracker failed (store_unavailable, log_unavailable, "
    "registry_unavailable); the message names it. Retry later.",
    "content": _content(_ref("Error")),
}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _op(
    summary: str,
    *,
    status: int = 200,
    answer: dict[str, Any] | None = None,
    media: str = _JSON,
    auth: str | None = None,
    body: dict[str, Any] | None = None,
    body_media: str = _JSON,
    body_required: bool = True,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One operation: ``status`` is the code the handler answers with on success."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            str(status): {"description": "OK", "content": _content(answer or _ANY_OBJECT, media)},
            "4XX": _ERROR,
            "503": _UNAVAILABLE,
        },
    }
    if auth:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs the {auth} token."
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": _content(body, body_media)}
    if parameters:
        op["parameters"] = parameters
    return op


def _signed(summary: str, schema: str, *, status: int = 200) -> dict[str, Any]:
    return _op(
        summary,
        status=status,
        body=_ref(schema),
        parameters=[
            {
                "name": SIGNATURE_HEADER,
                "in": "header",
                "required": True,
                "description": "Ed25519 signature of the exact body bytes, 128 hex digits",
                "schema": {"type": "string", "pattern": "^[0-9a-f]{128}$"},
            }
        ],
    )


def _healthz() -> dict[str, Any]:
    """Health answers 503 with its own body (not an Error) when a store fails."""
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": ["ok", "down"]}, "error": {"type": "string"}},
    }
    op = _op("Liveness and store health", answer=status)
    op["responses"]["503"] = {"description": "A store failed", "content": _content(status)}
    return op


def _move(summary: str, schema: str, *, body_required: bool) -> dict[str, Any]:
    """Promote and rollback: a JSON body naming the target, the channel's new head back."""
    return _op(
        summary,
        answer=_ref("Head"),
        auth="publisher or admin",
        body=_ref(schema),
        body_required=body_required,
        parameters=[_APP, _CH],
    )


def upload_op(
    summary: str, *, status: int = 200, answer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A signed manifest uploaded to a channel (a publish, a forecast's dry run)."""
    return _op(
        summary,
        status=status,
        answer=answer,
        auth="publisher or admin",
        body={"type": "string", "format": "binary"},
        body_media=_MANIFEST,
        parameters=[
            _APP,
            _CH,
            {"name": "rollout", "in": "query", "schema": _range(*PERCENT_RANGE)},
        ],
    )


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


_NAME = {"type": "string", "pattern": NAME_PATTERN}
_HEX64 = {"type": "string", "pattern": core.HEX64_PATTERN}
_KEY = {"type": "string", "pattern": f"^{KEY_PREFIX}{core.HEX64_PATTERN[1:]}"}
_NONCE = {"type": "string", "pattern": core.NONCE_PATTERN}
_TS = {"type": "integer", "minimum": 0, "maximum": core.MAX_TS}
_APP = _path("app", _NAME)
_CH = _path("channel", _NAME)
#: The peer handler takes any 40 hex digits (``bytes.fromhex``), either case.
_NODE = _path("node_id", {"type": "string", "pattern": "^[0-9a-fA-F]{40}$"})


def _range(lo: float, hi: float) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _bounded(hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": hi}


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
                "bytes_peers": count,
                "bytes_cdn": count,
                "bytes_reused": count,
                "bytes_patches": count,
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


def _paths() -> dict[str, Any]:
    since = {
        "name": "since",
        "in": "query",
        "schema": {"type": "integer", "minimum": -1, "maximum": MAX_SINCE},
    }
    #: who asks the feed, and what it runs: the build a staged rollout offers it
    node = {
        "name": "node",
        "in": "query",
        "schema": {"type": "string", "pattern": core.HEX40_PATTERN},
    }
    have = {"name": "have", "in": "query", "schema": _HEX64}
    return {
        "/healthz": {"get": _healthz()},
        "/v1/dht/bootstrap": {"get": _op("DHT nodes to bootstrap from (HOST:PORT list)")},
        "/metrics": {
            "get": _op("Prometheus metrics", answer={"type": "string"}, media="text/plain")
        },
        "/openapi.json": {"get": _op("This document")},
        "/dashboard": {
            "get": _op("Operator dashboard (HTML)", answer={"type": "string"}, media="text/html")
        },
        "/v1/apps": {
            "get": _op("List registered apps"),
            "post": _op(
                "Register an app and its publisher key",
                status=201,
                auth="admin",
                body=_ref("NewApp"),
            ),
        },
        "/v1/apps/{app}": {"get": _op("An app, its key and channel heads", parameters=[_APP])},
        "/v1/apps/{app}/token": {
            "post": _op(
                "Rotate the app's publisher token (the old one stops working)",
                status=201,
                auth="publisher or admin",
                answer={
                    "type": "object",
                    "required": ["app", "publisher_token"],
                    "properties": {"app": _NAME, "publisher_token": {"type": "string"}},
                },
                body={"type": "object", "maxProperties": 0, "description": "none needed"},
                body_required=False,
                parameters=[_APP],
            )
        },
        "/v1/apps/{app}/rotations": {
            "get": _op(
                "The app's publisher key rotations (a bencoded list of signed statements; "
                "empty: none), for nodes pinned to an earlier key",
                answer={"type": "string", "format": "binary"},
                media=ROTATIONS_MEDIA,
                parameters=[_APP],
            ),
            "post": _op(
                "Keep a key rotation signed by a key of the app (one per old key): builds "
                "signed by the new key are accepted, the old key's until old_until",
                status=201,
                auth="publisher or admin",
                answer={
                    "type": "object",
                    "required": ["app", "key", "old", "old_until", "rotations"],
                    "properties": {
                        "app": _NAME,
                        "key": _KEY,
                        "old": _KEY,
                        "old_until": {"type": "integer"},
                        "rotations": {"type": "integer"},
                    },
                },
                body={
                    "type": "string",
                    "format": "binary",
                    "description": f"at most {MAX_ROTATIONS_BYTES} bytes (else 413)",
                },
                body_media=ROTATION_MEDIA,
                parameters=[_APP],
            ),
        },
        "/v1/apps/{app}/channels/{channel}": {
            "get": _op(
                "Latest build of a channel; long-poll with since and wait",
                answer=_ref("Head"),
                parameters=[
                    _APP,
                    _CH,
                    since,
                    node,
                    have,
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
                    },
                ],
            )
        },
        "/v1/apps/{app}/channels/{channel}/events": {
            "get": _op(
                "Server-sent events: one `release` event per channel move",
                answer=_ref("ReleaseEvent"),
                media="text/event-stream",
                parameters=[_APP, _CH, since, node, have],
            )
        },
        "/v1/apps/{app}/channels/{channel}/history": {
            "get": _op("Channel history, newest first", parameters=[_APP, _CH])
        },
        "/v1/apps/{app}/channels/{channel}/manifests": {
            "post": upload_op("Publish a signed manifest", status=201)
        },
        "/v1/apps/{app}/channels/{channel}/promote": {
            "post": _move("Point a channel at a published build", "Promote", body_required=True)
        },
        "/v1/apps/{app}/channels/{channel}/rollback": {
            "post": _move(
                "Point a channel back at an earlier build", "Rollback", body_required=False
            )
        },
        "/v1/apps/{app}/channels/{channel}/rollout": {
            "get": _op(
                "The channel's staged rollout", answer=_ref("Rollout"), parameters=[_APP, _CH]
            ),
            "post": _op(
                "Raise, halt, resume or complete the channel's rollout",
                answer=_ref("Rollout"),
                auth="publisher or admin",
                body=_ref("RolloutChange"),
                parameters=[_APP, _CH],
            ),
        },
        "/v1/audit": {
            "get": _op(
                "The audit log, newest first, paged with before",
                answer=_ref("AuditPage"),
                auth="admin",
                parameters=[
                    {
                        "name": "before",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1 << 62},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_PAGE},
                    },
                ],
            )
        },
        "/v1/manifests/{manifest_id}": {
            "get": _op(
                "A signed manifest, byte for byte as published",
                answer={"type": "string", "format": "binary"},
                media=_MANIFEST,
                parameters=[_path("manifest_id", _HEX64)],
            )
        },
        "/v1/announce": {"post": _signed("Signed announce; returns ranked peers", "Announce")},
        "/v1/report": {"post": _signed("Signed peer-quality report", "Report")},
        "/v1/outcomes": {
            "post": _signed("Signed install outcome", "Outcome", status=201),
            "get": _op(
                "Install outcomes per build: success rate, failure codes",
                parameters=[{"name": "app", "in": "query", "schema": _NAME}],
            ),
        },
        "/v1/peers/{node_id}": {
            "get": _op("A peer's quality record", parameters=[_NODE]),
            "delete": _op(
                "Clear a peer's quality record and flag", auth="admin", parameters=[_NODE]
            ),
        },
        "/v1/stats": {"get": _op("Per-release swarm stats, peer quality, tracker load")},
        "/v1/apps/{app}/fleet": {
            "get": _op(
                "Nodes running each build of the app, adoption curves, client versions",
                answer=_ref("Fleet"),
                parameters=[_APP],
            )
        },
        "/v1/nodes/{node_id}": {
            "get": _op(
                "What one node runs in each app, and its recent install outcomes",
                answer=_ref("FleetNode"),
                parameters=[_NODE],
            )
        },
        **load_paths(),
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "p2pnode tracker",
            "version": "1",
            "description": "Release channels, update feed, signed announces and peer-quality "
            "reports. Normative text: docs/tracker-api.md.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
        "paths": _paths(),
    }
