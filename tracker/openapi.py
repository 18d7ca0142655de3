"""The OpenAPI 3.1 description served at ``/openapi.json``.

Written out by hand from the same facts as docs/tracker-api.md (the field tables there are the
normative text); a test checks every route of the app appears here, so the two cannot drift in
which endpoints exist.
"""

from __future__ import annotations

from typing import Any

from p2pnode.discovery.tracker_api import OUTCOME_CODES, OUTCOME_KINDS

__all__ = ["openapi_document"]

_ERROR = {
    "description": "Refused; nothing was stored",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


_UNAVAILABLE = {
    "description": "A store behind the tracker failed (store_unavailable, log_unavailable, "
    "registry_unavailable); the message names it. Retry later.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _op(summary: str, *, auth: str | None = None, body: str | None = None, **extra: Any) -> Any:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK"}, "4XX": _ERROR, "503": _UNAVAILABLE},
    }
    if auth:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs the {auth} token."
    if body:
        op["requestBody"] = {"required": True, "content": {body: {}}}
    op.update(extra)
    return op


def _signed(summary: str, schema: str) -> Any:
    return _op(
        summary,
        parameters=[
            {
                "name": "X-P2PNode-Signature",
                "in": "header",
                "required": True,
                "description": "Ed25519 signature of the exact body bytes, 128 hex digits",
                "schema": {"type": "string", "pattern": "^[0-9a-f]{128}$"},
            }
        ],
        requestBody={
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        },
    )


_APP = {"name": "app", "in": "path", "required": True, "schema": {"type": "string"}}
_CH = {"name": "channel", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document() -> dict[str, Any]:
    hexid = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    count = {"type": "integer", "minimum": 0}
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
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message", "fix"],
                    "properties": {
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                        "fix": {"type": "string"},
                    },
                },
                "Announce": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["key", "ts", "nonce", "app", "manifest", "port"],
                    "properties": {
                        "key": {"type": "string", "pattern": "^ed25519:[0-9a-f]{64}$"},
                        "ts": {"type": "integer"},
                        "nonce": {"type": "string", "pattern": "^[0-9a-f]{16,64}$"},
                        "app": {"type": "string"},
                        "manifest": hexid,
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "ip": {"type": "string"},
                        "event": {"enum": ["started", "update", "completed", "stopped"]},
                        "size": count,
                        "left": count,
                        "from_peers": count,
                        "from_cdn": count,
                        "uploaded": count,
                        "numwant": {"type": "integer", "minimum": 0, "maximum": 50},
                        "records": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                    },
                },
                "Outcome": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": [
                        "key",
                        "ts",
                        "nonce",
                        "app",
                        "manifest",
                        "kind",
                        "outcome",
                        "to_build",
                    ],
                    "properties": {
                        "key": {"type": "string", "pattern": "^ed25519:[0-9a-f]{64}$"},
                        "ts": {"type": "integer"},
                        "nonce": {"type": "string", "pattern": "^[0-9a-f]{16,64}$"},
                        "app": {"type": "string"},
                        "manifest": hexid,
                        "kind": {"enum": list(OUTCOME_KINDS)},
                        "outcome": {"enum": ["success", "failure"]},
                        "code": {"enum": list(OUTCOME_CODES)},
                        "duration_ms": count,
                        "from_build": count,
                        "to_build": count,
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
                        "key": {"type": "string"},
                        "ts": {"type": "integer"},
                        "nonce": {"type": "string"},
                        "peers": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 64,
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["node_id"],
                                "properties": {
                                    "node_id": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                                    "bytes": count,
                                    "rate": count,
                                    "failures": count,
                                    "corrupt": count,
                                },
                            },
                        },
                    },
                },
            },
        },
        "paths": {
            "/healthz": {"get": _op("Liveness and store health")},
            "/v1/dht/bootstrap": {"get": _op("DHT nodes to bootstrap from (HOST:PORT list)")},
            "/metrics": {"get": _op("Prometheus metrics")},
            "/openapi.json": {"get": _op("This document")},
            "/dashboard": {"get": _op("Operator dashboard (HTML)")},
            "/v1/apps": {
                "get": _op("List registered apps"),
                "post": _op(
                    "Register an app and its publisher key", auth="admin", body="application/json"
                ),
            },
            "/v1/apps/{app}": {"get": _op("An app, its key and channel heads", parameters=[_APP])},
            "/v1/apps/{app}/channels/{channel}": {
                "get": _op(
                    "Latest build of a channel; long-poll with since and wait",
                    parameters=[
                        _APP,
                        _CH,
                        {"name": "since", "in": "query", "schema": {"type": "integer"}},
                        {"name": "wait", "in": "query", "schema": {"type": "number"}},
                    ],
                )
            },
            "/v1/apps/{app}/channels/{channel}/events": {
                "get": _op(
                    "Server-sent events: one `release` event per channel move",
                    parameters=[_APP, _CH],
                )
            },
            "/v1/apps/{app}/channels/{channel}/history": {
                "get": _op("Channel history, newest first", parameters=[_APP, _CH])
            },
            "/v1/apps/{app}/channels/{channel}/manifests": {
                "post": _op(
                    "Publish a signed manifest",
                    auth="publisher or admin",
                    body="application/x-p2pnode-manifest",
                    parameters=[_APP, _CH],
                )
            },
            "/v1/apps/{app}/channels/{channel}/promote": {
                "post": _op(
                    "Point a channel at a published build",
                    auth="publisher or admin",
                    body="application/json",
                    parameters=[_APP, _CH],
                )
            },
            "/v1/apps/{app}/channels/{channel}/rollback": {
                "post": _op(
                    "Point a channel back at an earlier build",
                    auth="publisher or admin",
                    body="application/json",
                    parameters=[_APP, _CH],
                )
            },
            "/v1/manifests/{manifest_id}": {
                "get": _op(
                    "A signed manifest, byte for byte as published",
                    parameters=[
                        {"name": "manifest_id", "in": "path", "required": True, "schema": hexid}
                    ],
                )
            },
            "/v1/announce": {"post": _signed("Signed announce; returns ranked peers", "Announce")},
            "/v1/report": {"post": _signed("Signed peer-quality report", "Report")},
            "/v1/outcomes": {
                "post": _signed("Signed install outcome (201)", "Outcome"),
                "get": _op("Install outcomes per build: success rate, failure codes"),
            },
            "/v1/peers/{node_id}": {
                "get": _op("A peer's quality record"),
                "delete": _op("Clear a peer's quality record and flag", auth="admin"),
            },
            "/v1/stats": {"get": _op("Per-release swarm stats, peer quality, tracker load")},
        },
    }
