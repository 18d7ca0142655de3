"""The OpenAPI description of the load routes (:mod:`tracker.load_http`), merged into
``/openapi.json`` by :mod:`tracker.openapi` from the same definitions the handlers use and the
same parts (:mod:`tracker.openapi_parts`)."""

from __future__ import annotations

from typing import Any

from .forecast import BINS, CHUNKS_ONLY_MODEL, EVENTS, HORIZON_MIN, MODEL
from .load_http import BUILD_PATTERN
from .openapi_parts import _APP, _HEX64, _NAME, _op, _path, _ref, upload_op
from .traffic import ADD_NAMES, LEVEL_NAMES

__all__ = ["load_paths", "load_schemas"]

_INT = {"type": "integer"}
_NUM = {"type": "number"}
_POINTS = {
    "type": "array",
    "items": {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2},
}


def load_schemas() -> dict[str, Any]:
    minute = {
        "type": "object",
        "required": ["t", *LEVEL_NAMES, *ADD_NAMES],
        "properties": {
            "t": {**_INT, "description": "the minute's start (Unix s, UTC)"},
            "completed": {**_INT, "description": "nodes that completed the build"},
            "peers": {**_INT, "description": "bytes announced from peers (chunks and patches)"},
            "cdn": {
                **_INT,
                "description": "bytes announced from the CDN (chunks and patches: its egress)",
            },
            "reused": {**_INT, "description": "bytes reused from earlier builds (outcomes)"},
            "patches": {**_INT, "description": "bytes of delta patches fetched (outcomes)"},
            "patches_cdn": {
                **_INT,
                "description": "of patches, those from the CDN, within cdn (outcomes; nodes "
                "before the split send none)",
            },
            "patches_peers": {
                **_INT,
                "description": "of patches, those from peers, within peers (outcomes)",
            },
        },
    }
    forecast = {
        "type": "object",
        "required": [
            "model",
            "at",
            "nodes",
            "adopters",
            "need_bytes",
            "cdn_total",
            "cdn_peak_per_min",
            "cdn_peak_at",
            "offload",
            "basis",
        ],
        "properties": {
            "model": {
                "enum": [MODEL, CHUNKS_ONLY_MODEL],
                "description": f"{CHUNKS_ONLY_MODEL}: made before the CDN figures counted "
                "patches (cdn_total in chunk bytes, compared with cdn - patches_cdn)",
            },
            "app": _NAME,
            "channel": _NAME,
            "build": _INT,
            "manifest_id": _HEX64,
            "event": {
                "enum": list(EVENTS),
                "description": "what the forecast was made at (a dry run: publish)",
            },
            "at": {
                **_NUM,
                "description": "when the event happened (or the build would be published)",
            },
            "nodes": {**_INT, "description": "nodes of the channel's fleet"},
            "percent": {**_NUM, "description": "the rollout's percentage after the event"},
            "was_percent": {**_NUM, "description": "before it (a rollout raise), else 0"},
            "adopters": {**_NUM, "description": "nodes x (percent - was_percent) / 100"},
            "size_bytes": _INT,
            "need_bytes": {**_INT, "description": "chunk bytes one node lacks, on average"},
            "patch_need_bytes": {**_INT, "description": "delta patch bytes one node fetches"},
            "patches_total": {**_INT, "description": "predicted patch bytes (peers or CDN)"},
            "cdn_chunks_total": {**_INT, "description": "of cdn_total, chunk bytes"},
            "cdn_patches_total": {
                **_INT,
                "description": "of cdn_total, delta patch bytes (the series' patches_cdn)",
            },
            "join_rate_per_hour": {
                **_NUM,
                "description": "nodes joining the channel's fleet per hour (the fleet view's "
                "first-seen rate)",
            },
            "joiners": {
                **_NUM,
                "description": f"late joiners let in over the first {HORIZON_MIN} min, each "
                "fetching the whole build",
            },
            "joiners_cdn_total": {**_INT, "description": "their part of cdn_total"},
            "basis": {"enum": ["history", "default"]},
            "history_builds": {"type": "array", "items": _INT},
            "offload": {"type": "array", "items": _NUM, "minItems": BINS, "maxItems": BINS},
            "cdn_total": {
                **_INT,
                "description": "predicted CDN egress (bytes): chunks and patches, what the "
                "series' cdn counts",
            },
            "peers_total": _INT,
            "cdn_peak_per_min": {**_INT, "description": "predicted busiest minute (bytes)"},
            "cdn_peak_at": _NUM,
            "curve": {
                **_POINTS,
                "description": f"[minute (Unix s), predicted CDN bytes], first {HORIZON_MIN} min",
            },
            "mirrors": {
                "type": "array",
                "description": "cdn_total split per mirror of the manifest, as nodes spread "
                "their requests (url null: the manifest lists none)",
                "items": {
                    "type": "object",
                    "required": ["url", "share", "cdn_total", "cdn_peak_per_min", "cdn_peak_at"],
                    "properties": {
                        "url": {"type": ["string", "null"]},
                        "share": _NUM,
                        "cdn_total": _INT,
                        "cdn_peak_per_min": _INT,
                        "cdn_peak_at": _INT,
                    },
                },
            },
            "need_by_build": {"type": "array", "items": {"type": "object"}},
        },
    }
    actual = {
        "type": "object",
        "description": "what followed the event, until the build's next event",
        "required": ["elapsed_s", "actual", "cdn_actual_total", "cdn_predicted_so_far"],
        "properties": {
            "elapsed_s": _INT,
            "actual": {**_POINTS, "description": "[minute (Unix s), actual CDN bytes]"},
            "cdn_actual_total": _INT,
            "patches_actual_total": _INT,
            "cdn_patches_actual_total": {
                **_INT,
                "description": "of cdn_actual_total, patch bytes (patches_cdn)",
            },
            "cdn_predicted_so_far": _INT,
            "cdn_actual_peak_per_min": _INT,
            "cdn_actual_peak_at": {"type": ["integer", "null"]},
            "total_ratio": {"type": ["number", "null"], "description": "actual / predicted"},
            "peak_ratio": {"type": ["number", "null"]},
        },
    }
    hour = {
        "type": "object",
        "required": ["histogram", "days", "announces", "recommended_hour", "quietest_hour"],
        "properties": {
            "histogram": {"type": "array", "items": _INT, "minItems": 24, "maxItems": 24},
            "days": _INT,
            "announces": _INT,
            "recommended_hour": {"type": ["integer", "null"], "minimum": 0, "maximum": 23},
            "recommended_share": _NUM,
            "quietest_hour": {"type": ["integer", "null"], "minimum": 0, "maximum": 23},
            "window_hours": _INT,
        },
    }
    return {
        "Traffic": {
            "type": "object",
            "required": ["app", "build", "manifest_id", "minute_s", "totals", "series"],
            "properties": {
                "app": _NAME,
                "build": _INT,
                "manifest_id": _HEX64,
                "minute_s": _INT,
                "retention_s": _INT,
                "totals": {"type": "object", "additionalProperties": _INT},
                "offload_ratio": {"type": ["number", "null"]},
                "series": {"type": "array", "items": minute},
            },
        },
        "Forecast": forecast,
        "ForecastReport": {
            "type": "object",
            "required": ["forecast", "actual", "events"],
            "properties": {
                "forecast": _ref("Forecast"),
                "actual": actual,
                "events": {
                    "type": "array",
                    "description": "every event's forecast (publish, promotes, rollout "
                    "raises), oldest first, each beside what followed until the next; "
                    "forecast and actual above are the first's",
                    "items": {
                        "type": "object",
                        "required": ["forecast", "actual"],
                        "properties": {"forecast": _ref("Forecast"), "actual": actual},
                    },
                },
            },
        },
        "Load": {
            "type": "object",
            "required": ["app", "release_hour", "forecasts"],
            "properties": {
                "app": _NAME,
                "release_hour": hour,
                "forecasts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "description": "a Forecast (of any event) without need_by_build, with "
                        "its curve as predicted and what followed as actual, newest first",
                        "properties": {"predicted": _POINTS, "actual": actual},
                    },
                },
            },
        },
    }


def load_paths() -> dict[str, Any]:
    build = _path("build", {"type": "string", "pattern": BUILD_PATTERN})
    manifest = {
        "name": "manifest",
        "in": "query",
        "description": "which manifest, when two channels hold the build number",
        "schema": _HEX64,
    }
    params = [_APP, build, manifest]
    return {
        "/v1/apps/{app}/builds/{build}/traffic": {
            "get": _op(
                "The build's bytes by source and completions per minute (7 days kept)",
                answer={"$ref": "#/components/schemas/Traffic"},
                parameters=params,
            )
        },
        "/v1/apps/{app}/builds/{build}/forecast": {
            "get": _op(
                "The CDN egress forecasts made at the build's events (publish, promotes, "
                "rollout raises), each beside what followed",
                answer={"$ref": "#/components/schemas/ForecastReport"},
                parameters=params,
            )
        },
        "/v1/apps/{app}/channels/{channel}/forecast": {
            "post": upload_op(
                "Dry run: the forecast of publishing this signed manifest now (not recorded)",
                answer={"$ref": "#/components/schemas/Forecast"},
            )
        },
        "/v1/apps/{app}/load": {
            "get": _op(
                "The recommended release hour and recent forecasts against what followed",
                answer={"$ref": "#/components/schemas/Load"},
                parameters=[_APP],
            )
        },
    }
