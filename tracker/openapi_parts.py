"""The parts the OpenAPI description (:mod:`tracker.openapi`) is built from: the operation
builder with its shared error answers, and the path parameters and field schemas that carry the
handlers' own patterns and bounds (imported from :mod:`tracker.core` and the manifest's name
rule), shared by the components, the paths and the load routes' part
(:mod:`tracker.load_openapi`)."""

from __future__ import annotations

from typing import Any

from p2pnode.release.keys import KEY_PREFIX
from p2pnode.release.manifest import NAME_PATTERN

from . import core
from .operations import PERCENT_RANGE

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
