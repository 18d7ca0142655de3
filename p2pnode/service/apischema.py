"""The local API's request and answer shapes, and the OpenAPI document built from them.

One set of definitions serves both: the handlers check every request body with
:func:`check_body` against the schemas in :data:`BODIES`, and :func:`openapi_document` puts the
same dicts into ``/api/v1/openapi.json``; a bound changed here changes both. The checker knows
only the small JSON Schema subset these bodies use (object, string, integer, number, boolean,
array, enum, anyOf, type lists, required, additionalProperties false, patterns, length and value
bounds), so the service needs no schema library at run time. What the API takes is exactly what
the document declares; deeper checks (a trust key's form) stay with the cores (``library``,
``settings``), which raise ``UsageError`` with a fix.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import UsageError
from ..release.manifest import NAME_PATTERN
from .job import JobKind, JobState
from .library import MAX_TRUST_KEYS, MAX_URL
from .schedule import MAX_WINDOWS
from .settings import KEYS

__all__ = ["BODIES", "PREFIX", "check_body", "openapi_document"]

PREFIX = "/api/v1"

_PRIORITY = {"enum": ["high", "normal", "low"]}
_ID = {"type": "string", "minLength": 1, "maxLength": 32}
_RATE = {
    "type": ["string", "integer"],
    "maxLength": 32,
    # units.parse_size's form (the server also takes other Unicode digits and spaces)
    "pattern": r"^ *[0-9]+(\.[0-9]+)? *[KMGTkmgt]?([Ii]?[Bb])? *$",
    "minimum": 0,
    "maximum": 2**53,
    "description": "bytes/s, or with K/M/G as on the command line; 0: no cap",
}
_DAY = {"enum": ["all", "weekdays", "weekend", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]}
_TIME_OF_DAY = {"type": "string", "pattern": "^([01]?[0-9]|2[0-3]):[0-5][0-9]$"}
_WINDOW_KEYS = {
    "days": {
        "anyOf": [_DAY, {"type": "array", "minItems": 1, "maxItems": 16, "items": _DAY}],
        "description": 'default "all"',
    },
    "begin": {**_TIME_OF_DAY, "description": "HH:MM, local time"},
    "end": {**_TIME_OF_DAY, "description": "HH:MM; at or before begin: the next day"},
}


def _windows(**extra: Any) -> dict[str, Any]:
    """An array of schedule windows (schedule.py), each with ``extra`` keys beside its own."""
    item = {
        "type": "object",
        "additionalProperties": False,
        "required": ["begin", "end"],
        "properties": {**_WINDOW_KEYS, **extra},
    }
    return {"type": "array", "maxItems": MAX_WINDOWS, "items": item}


_NULLABLE = {"type": "null", "description": "null: back to the config file's value"}

#: Request bodies, by name (the OpenAPI component names).
BODIES: dict[str, dict[str, Any]] = {
    "NewEntry": {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "dest", "trust"],
        "properties": {
            "source": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_URL,
                "description": "the app's name (with tracker) or a manifest's http(s) URL",
            },
            "dest": {"type": "string", "minLength": 1, "maxLength": 4096},
            "trust": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_TRUST_KEYS,
                "items": {"type": "string", "maxLength": 80},
            },
            "channel": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64},
            "tracker": {"type": "string", "maxLength": MAX_URL},
            "auto_update": {"type": "boolean"},
            "priority": _PRIORITY,
        },
    },
    "EntryChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["auto_update"],
        "properties": {"auto_update": {"type": "boolean"}},
    },
    "NewJob": {
        "type": "object",
        "additionalProperties": False,
        "required": ["entry", "kind"],
        "properties": {
            "entry": _ID,
            "kind": {"enum": [JobKind.INSTALL.value, JobKind.UPDATE.value, JobKind.VERIFY.value]},
            "target": {"type": "string", "minLength": 1, "maxLength": MAX_URL},
            "priority": _PRIORITY,
        },
    },
    "Move": {
        "type": "object",
        "additionalProperties": False,
        "required": ["to"],
        "properties": {
            "to": {
                "type": "string",
                "minLength": 1,
                "maxLength": 4096,
                "description": "the new DEST: absolute, a new or empty directory",
            },
            "priority": _PRIORITY,
        },
    },
    "PriorityChange": {
        "type": "object",
        "additionalProperties": False,
        "required": ["priority"],
        "properties": {"priority": {"enum": ["high", "normal", "low", "top"]}},
    },
    "Defer": {
        "type": "object",
        "additionalProperties": False,
        "required": ["until"],
        "properties": {
            "until": {
                "type": "number",
                "minimum": 0,
                "maximum": 1e11,
                "description": "wall-clock seconds (Unix time); a past time lets it start now",
            }
        },
    },
    "EntryRef": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"entry": _ID},
    },
    "EntryRequired": {
        "type": "object",
        "additionalProperties": False,
        "required": ["entry"],
        "properties": {"entry": _ID},
    },
    "SettingsPatch": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "description": "one or more settings; all are applied or none; null resets a key",
        "properties": {
            "max_active": {"type": ["integer", "null"], "minimum": 1, "maximum": 64},
            "max_download_rate": {**_RATE, "type": ["string", "integer", "null"]},
            "max_upload_rate": {**_RATE, "type": ["string", "integer", "null"]},
            "alt_speed": {
                **_windows(download=_RATE, upload=_RATE),
                "type": ["array", "null"],
                "description": "windows with their own caps (download, upload)",
            },
            "update_window": {**_windows(), "type": ["array", "null"]},
        },
    },
}
assert set(BODIES["SettingsPatch"]["properties"]) == set(KEYS)

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: object, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def _check(value: object, schema: dict[str, Any], where: str) -> None:
    """Raise ``UsageError`` naming ``where`` if ``value`` breaks ``schema``."""
    kinds = schema.get("type")
    if kinds is not None:
        names = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, n) for n in names):
            raise UsageError(
                f"{where} must be {' or '.join(names)}", fix="see /api/v1/openapi.json"
            )
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(str(c) for c in schema["enum"])
        raise UsageError(f"{where} must be one of {choices}", fix=f"use one of {choices}")
    if "anyOf" in schema:
        _check_any(value, schema["anyOf"], where)
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30):
            raise UsageError(f"{where} is empty or too long", fix="see /api/v1/openapi.json")
        if "pattern" in schema and not _matches(schema["pattern"], value):
            raise UsageError(
                f"{where} {value!r} is not of the form {schema['pattern']}",
                fix="see /api/v1/openapi.json",
            )
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not schema.get("minimum", -float("inf")) <= value <= schema.get("maximum", float("inf")):
            lo, hi = schema.get("minimum"), schema.get("maximum")
            raise UsageError(f"{where} is out of range [{lo}, {hi}]", fix=f"pass {lo} to {hi}")
    elif isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30):
            lo, hi = schema.get("minItems", 0), schema.get("maxItems")
            raise UsageError(f"{where} must have {lo} to {hi} items", fix=f"pass {lo} to {hi}")
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{where}[{i}]")
    elif isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise UsageError(
                    f"{where} has an unknown field {extra[0]!r}",
                    fix=f"use only {', '.join(props) or 'no fields'}",
                )
        missing = [k for k in schema.get("required", ()) if k not in value]
        if missing:
            raise UsageError(f"{where} needs the field {missing[0]!r}", fix="add it")
        if len(value) < schema.get("minProperties", 0):
            raise UsageError(f"{where} is empty", fix=f"pass at least one of {', '.join(props)}")
        for k, v in value.items():
            if k in props:
                _check(v, props[k], f"{where}.{k}")


def _check_any(value: object, choices: list[dict[str, Any]], where: str) -> None:
    """``anyOf``: the first choice's complaint when none fits."""
    first: UsageError | None = None
    for choice in choices:
        try:
            _check(value, choice, where)
        except UsageError as exc:
            first = first or exc
        else:
            return
    assert first is not None
    raise first


def _matches(pattern: str, value: str) -> bool:
    """A JSON Schema ``pattern`` (ECMA-262: a search, ``$`` only at the very end) in Python's
    ``re``, whose ``$`` would also match before a final newline; the patterns here use only
    the syntax both share (classes, groups, ``?``/``*``/``+``/``{m,n}``, anchors)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, value) is not None


def _whole(value: object) -> object:
    """``value`` with every whole-number float (``5.0``) as an int: JSON Schema's integer
    takes both spellings, and the cores expect an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def check_body(name: str, body: object) -> dict[str, Any]:
    """The body as the handler may use it, or ``UsageError`` (a 400) if it breaks ``name``."""
    body = _whole(body)
    _check(body, BODIES[name], "the request body")
    assert isinstance(body, dict)
    return body


# Answers ---------------------------------------------------------------------------------

_PROGRESS = {
    "type": "object",
    "required": ["bytes_done", "bytes_total", "rate", "by_source", "peers"],
    "properties": {
        "bytes_done": {"type": "integer"},
        "bytes_total": {"type": ["integer", "null"]},
        "rate": {"type": "number", "description": "bytes/s"},
        "by_source": {"type": "object", "additionalProperties": {"type": "integer"}},
        "peers": {
            "type": "integer",
            "description": "peers the job's build is exchanged with now (0 once it stops)",
        },
    },
}
_ANSWERS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error", "fix", "code"],
        "properties": {
            "error": {"type": "string", "description": "what went wrong"},
            "fix": {"type": "string", "description": "what to do about it"},
            "code": {"type": "string"},
        },
    },
    "Entry": {
        "type": "object",
        "required": ["id", "source", "dest", "trust", "channel", "auto_update"],
        "properties": {
            "id": {"type": "string"},
            "source": {"type": "string"},
            "dest": {"type": "string"},
            "trust": {"type": "array", "items": {"type": "string"}},
            "channel": {"type": "string"},
            "tracker": {"type": ["string", "null"]},
            "auto_update": {"type": "boolean"},
            "added": {"type": "number"},
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "entry", "app", "kind", "state", "bytes_done", "bytes_total", "rate"],
        "properties": {
            "id": {"type": "string"},
            "entry": {"type": "string"},
            "app": {"type": ["string", "null"]},
            "dest": {"type": ["string", "null"]},
            "kind": {"enum": [k.value for k in JobKind]},
            "state": {"enum": [s.value for s in JobState]},
            "priority": {"enum": ["high", "normal", "low"]},
            "critical": {"type": "boolean"},
            "auto": {"type": "boolean"},
            "target": {"type": ["string", "null"]},
            "not_before": {"type": ["number", "null"]},
            "attempt": {"type": "integer"},
            "error": {"type": ["string", "null"]},
            "finished": {"type": ["number", "null"]},
            "bytes_done": {"type": "integer"},
            "bytes_total": {"type": ["integer", "null"]},
            "rate": {"type": "number"},
            "progress": _PROGRESS,
        },
    },
    "Settings": {
        "type": "object",
        "required": ["max_active", "max_download_rate", "max_upload_rate", "caps_now"],
        "properties": {
            "max_active": {"type": "integer"},
            "max_download_rate": {"type": ["integer", "null"]},
            "max_upload_rate": {"type": ["integer", "null"]},
            "alt_speed": {"type": "array", "items": {"type": "object"}},
            "update_window": {"type": "array", "items": {"type": "object"}},
            "overrides": {"type": "array", "items": {"type": "string"}},
            "caps_now": {"type": "object"},
            "update_window_open": {"type": "boolean"},
        },
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(field: str, item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [field],
        "properties": {field: {"type": "array", "items": _ref(item)}},
    }


def _op(
    summary: str,
    answer: dict[str, Any] | None = None,
    *,
    status: int = 200,
    body: str | None = None,
    body_optional: bool = False,
    params: tuple[str, ...] = (),
    media: str = "application/json",
    public: bool = False,
) -> dict[str, Any]:
    """One operation; every one needs the token unless ``public``."""
    error = {"description": "Refused; nothing changed", "content": _json(_ref("Error"))}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            str(status): {
                "description": "OK",
                "content": {media: {"schema": answer or {"type": "object"}}},
            },
            "4XX": error,
        },
    }
    op["security"] = [] if public else [{"bearer": []}, {"cookie": []}]
    if body is not None:
        op["requestBody"] = {"required": not body_optional, "content": _json(_ref(body))}
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": _ID} for p in params
        ]
    return op


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _paths() -> dict[str, Any]:
    entry, job = _ref("Entry"), _ref("Job")
    added = {
        "type": "object",
        "required": ["id", "entry", "job"],
        "properties": {"id": {"type": "string", "description": "the job's id"}, "entry": entry},
    }
    jobs = _list_of("jobs", "Job")
    return {
        "/library": {
            "get": _op("The library's entries", _list_of("entries", "Entry")),
            "post": _op("Add a game and queue its install", added, status=201, body="NewEntry"),
        },
        "/library/{entry}": {
            "get": _op("One entry", entry, params=("entry",)),
            "patch": _op(
                "Turn auto-update on or off", entry, body="EntryChange", params=("entry",)
            ),
            "delete": _op("Forget an entry (its files stay)", entry, params=("entry",)),
        },
        "/library/{entry}/move": {
            "post": _op(
                "Queue a move of the installed game, the user's files included, to a new DEST",
                job,
                status=201,
                body="Move",
                params=("entry",),
            ),
        },
        "/jobs": {
            "get": _op("Jobs: running and waiting in run order, then history", jobs),
            "post": _op("Queue a job for an entry", job, status=201, body="NewJob"),
        },
        "/jobs/{job}": {
            "get": _op("One job (a library entry's id: its unfinished job)", job, params=("job",)),
            "delete": _op("Forget a finished job", job, params=("job",)),
        },
        **{
            f"/jobs/{{job}}/{verb}": {
                "post": _op(f"{verb.capitalize()} a job", job, params=("job",))
            }
            for verb in ("pause", "resume", "cancel")
        },
        "/jobs/{job}/priority": {
            "post": _op(
                "Set a job's priority, or move it to the top",
                job,
                body="PriorityChange",
                params=("job",),
            ),
        },
        "/jobs/{job}/defer": {
            "post": _op("Hold an update until a time", job, body="Defer", params=("job",)),
        },
        "/updates/check": {
            "post": _op(
                "Queue an update of one entry (or every entry) as the feed would: "
                "it waits for an update window",
                jobs,
                body="EntryRef",
                body_optional=True,  # no body: every entry
            ),
        },
        "/updates/apply": {
            "post": _op(
                "Install an entry's update now: past windows and deferral",
                job,
                body="EntryRequired",
            ),
        },
        "/updates/history": {"get": _op("Finished update jobs, newest first", jobs)},
        "/verify": {
            "post": _op(
                "Verify an entry and repair what is damaged",
                job,
                status=201,
                body="EntryRequired",
            )
        },
        "/verify/{entry}": {
            "get": _op(
                "The entry's latest verify job: its state is the result", job, params=("entry",)
            ),
        },
        "/settings": {
            "get": _op("Settings in force", _ref("Settings")),
            "patch": _op("Change one or more settings", _ref("Settings"), body="SettingsPatch"),
        },
        "/settings/schedule": {
            "get": _op("Alt-speed windows, update windows, the caps now", {"type": "object"}),
        },
        "/snapshot": {"get": _op("Library, jobs and settings in one document")},
        "/events": {
            "get": _op(
                "Server-sent events: `snapshot` on connect and after changes (coalesced), "
                "keepalive comments",
                {
                    "type": "object",
                    "description": "one event (the schema of a text/event-stream answer "
                    "describes each event): `data` is the snapshot, as JSON",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"const": "snapshot"},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                        "retry": {"type": "integer"},
                    },
                },
                media="text/event-stream",
            )
        },
        "/openapi.json": {"get": _op("This document", public=True)},
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "p2pnode local API",
            "version": "1",
            "description": "The client service's API on loopback. Security model and examples: "
            "docs/api.md.",
        },
        "servers": [{"url": PREFIX}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "p2pnode_token"},
            },
            "schemas": {**BODIES, **_ANSWERS},
        },
        "paths": _paths(),
    }
