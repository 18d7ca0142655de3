"""The paths of the OpenAPI description (:mod:`tracker.openapi`): one operation per route the
tracker serves, with its parameters, body and the status it answers with on success."""

from __future__ import annotations

from typing import Any

from p2pnode.discovery.tracker_api import SIGNATURE_HEADER
from p2pnode.release.rotation import MAX_ROTATIONS_BYTES

from . import core
from .channels import MAX_SINCE, MAX_WAIT
from .keyrotation import ROTATION_MEDIA, ROTATIONS_MEDIA
from .load_openapi import load_paths
from .openapi_parts import (
    _APP,
    _CH,
    _HEX64,
    _KEY,
    _MANIFEST,
    _NAME,
    _NODE,
    _content,
    _op,
    _path,
    _ref,
    upload_op,
)
from .operations import MAX_AUDIT_PAGE
from .outcomes import SERIES_HOURS


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
                "Install outcomes per build: success rate, failure codes, rollbacks; with "
                "hours=N, each build's hourly series over the last N hours",
                parameters=[
                    {"name": "app", "in": "query", "schema": _NAME},
                    {
                        "name": "hours",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": SERIES_HOURS},
                    },
                ],
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
