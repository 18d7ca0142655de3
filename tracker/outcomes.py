"""Install outcomes: what nodes say became of each install, update, repair and rollback.

Theory of operation
-------------------
A node sends one signed ``POST /v1/outcomes`` per attempt (docs/tracker-api.md): the kind,
success or a failure code from the shared list (``tracker_api.OUTCOME_CODES``), its duration,
its bytes by source, and the builds it went from and to. :func:`parse_outcome` verifies and
checks it as :func:`tracker.core.parse_report` does a report (signature, clock skew, nonce);
:func:`counts_of` names the counters an accepted outcome adds to its build's tally, and
:func:`summary` turns a build's counters into success rate, failure codes, rollbacks and bytes.
It does no I/O: the tally lives in the operations store (:class:`tracker.backend.OpsStore`,
SQLite beside the registry or the registry's Redis), so replicas share one count and a restart
keeps it; the store also keeps the replay guard, so an outcome replayed to another replica is
refused too.

**Over time.** Beside the lifetime tally each build has an hourly series (:data:`SERIES_STEP`
buckets, the last :data:`SERIES_HOURS` kept): successes, failures by code and rollbacks from
it (:func:`series_counts`), which ``GET /v1/outcomes?hours=N`` shows (:func:`series_view`)
and the dashboard charts. ``/metrics`` needs no series: Prometheus keeps its own from the
lifetime counters.

Bounded: the stores tally at most ``MAX_RELEASES`` builds (the least recently reported goes
first), every counter name is from a closed list, and the replay guard keeps each signature
digest for ``2 * MAX_SKEW`` seconds (the app also rate-limits each node).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

from p2pnode.discovery.tracker_api import OUTCOME_CODES, OUTCOME_DOMAIN, OUTCOME_KINDS
from p2pnode.release import keys

from .core import (
    MAX_BYTES,
    _hex_id,
    _int,
    _key,
    _name,
    _nonce,
    _only,
    _ts,
    verify_signed_body,
)
from .errors import BadRequest, TooLarge

__all__ = [
    "MAX_BUILD",
    "MAX_DURATION_MS",
    "MAX_OUTCOME_BYTES",
    "MAX_RELEASES",
    "SERIES_HOURS",
    "SERIES_STEP",
    "SOURCES",
    "Outcome",
    "SeriesRows",
    "counts_of",
    "parse_outcome",
    "series_counts",
    "series_view",
    "summary",
    "tallies_of",
]

MAX_OUTCOME_BYTES = 2048
#: Builds tallied at most; reporting on another drops the least recently reported one.
MAX_RELEASES = 2000
#: The longest attempt an outcome may report (a week, in milliseconds).
MAX_DURATION_MS = 7 * 24 * 3600 * 1000
MAX_BUILD = (1 << 63) - 1
#: The outcome series' bucket, in seconds (an hour), and how many buckets are kept (7 days):
#: at most MAX_RELEASES x SERIES_HOURS x (2 + codes) counters, far fewer in practice (only
#: hours with reports have any).
SERIES_STEP = 3600
SERIES_HOURS = 7 * 24
#: Per build, its hourly series as the stores keep it: ``(hour, name, n)`` rows (hour:
#: seconds since the epoch // SERIES_STEP; names from :func:`series_counts`).
SeriesRows = dict[bytes, list[tuple[int, str, int]]]
#: Sources of an attempt's bytes, as the body names them (``bytes_<source>``). ``peers`` and
#: ``cdn`` count everything from there, chunks and delta patches; ``patches`` is the patch
#: bytes, and ``patches_cdn`` / ``patches_peers`` how many of them came from each source (so
#: ``cdn - patches_cdn`` is chunks). Nodes older than the split send none (0): their patches
#: count in ``patches`` only, and ``patches - patches_cdn - patches_peers`` is that unsplit rest.
SOURCES = ("peers", "cdn", "reused", "patches", "patches_cdn", "patches_peers")

_REQUIRED = frozenset({"key", "ts", "nonce", "app", "manifest", "kind", "outcome", "to_build"})
_OPTIONAL = frozenset({"code", "duration_ms", "from_build", *(f"bytes_{s}" for s in SOURCES)})


@dataclass(frozen=True, slots=True)
class Outcome:
    node_id: bytes
    app: str
    manifest: bytes  # the build the attempt went to
    kind: str
    code: str | None  # None: success
    duration_ms: int
    from_build: int | None
    to_build: int
    bytes: tuple[int, ...]  # by SOURCES (a shorter tuple: the sources after it are 0)
    #: a rollback's build it fled (the app's manifest with build ``from_build``, found by the
    #: app in the registry; None when unknown or ambiguous): "rollbacks from it" count there
    from_manifest: builtins.bytes | None = None

    def bytes_by_source(self) -> dict[str, int]:
        return dict(zip(SOURCES, (*self.bytes, *[0] * len(SOURCES)), strict=False))


def parse_outcome(body: bytes, signature_hex: str | None, *, now: float) -> Outcome:
    """Verify and parse a signed outcome. See docs/tracker-api.md."""
    if len(body) > MAX_OUTCOME_BYTES:
        raise TooLarge(f"outcome body is {len(body)} bytes, the limit is {MAX_OUTCOME_BYTES}")
    obj = verify_signed_body(body, signature_hex, OUTCOME_DOMAIN)
    _only(obj, required=set(_REQUIRED), optional=set(_OPTIONAL))
    node_id = keys.node_id_of(_key(obj["key"]))
    _ts(obj, now)
    _nonce(obj)
    kind = obj["kind"]
    if kind not in OUTCOME_KINDS:
        raise BadRequest(f"kind must be one of {', '.join(OUTCOME_KINDS)}")
    if obj["outcome"] == "success":
        if "code" in obj:
            raise BadRequest("a successful outcome has no code")
        code = None
    elif obj["outcome"] == "failure":
        code = obj.get("code")
        if code not in OUTCOME_CODES:
            raise BadRequest(
                "a failure needs a code, one of " + ", ".join(OUTCOME_CODES),
                fix="map the error to the closest code, or 'other'",
            )
    else:
        raise BadRequest("outcome must be 'success' or 'failure'")

    by = {s: _int(obj, f"bytes_{s}", 0, MAX_BYTES, 0) for s in SOURCES}
    if (
        by["patches_cdn"] + by["patches_peers"] > by["patches"]
        or by["patches_cdn"] > by["cdn"]
        or by["patches_peers"] > by["peers"]
    ):
        raise BadRequest(
            "bytes_patches_cdn and bytes_patches_peers are the parts of bytes_patches that came "
            "from the CDN and from peers (also counted in bytes_cdn and bytes_peers)",
            fix="send parts that fit in those totals",
        )
    return Outcome(
        node_id=node_id,
        app=_name(obj, "app"),
        manifest=_hex_id(obj, "manifest"),
        kind=kind,
        code=code,
        duration_ms=_int(obj, "duration_ms", 0, MAX_DURATION_MS, 0),
        from_build=_int(obj, "from_build", 0, MAX_BUILD) if "from_build" in obj else None,
        to_build=_int(obj, "to_build", 0, MAX_BUILD),
        bytes=tuple(by[s] for s in SOURCES),
    )


def counts_of(o: Outcome) -> dict[str, int]:
    """The counters one outcome adds to its build's tally (the stores sum them per build):
    ``ok:KIND`` / ``fail:KIND``, ``code:CODE``, ``bytes:SOURCE`` and ``ms`` (summed over
    successes). Every name comes from a closed list, so a tally has a bounded set of fields."""
    out = {f"bytes:{s}": n for s, n in o.bytes_by_source().items() if n}
    if o.code is None:
        out[f"ok:{o.kind}"] = 1
        out["ms"] = o.duration_ms
    else:
        out[f"fail:{o.kind}"] = 1
        out[f"code:{o.code}"] = 1
    return out


def tallies_of(o: Outcome) -> list[tuple[bytes, int, dict[str, int]]]:
    """Every build's counters one outcome adds, as (manifest, build, counters) in manifest
    order (the stores lock rows in that order): its own build's (:func:`counts_of`), and for
    a rollback whose fled build is known, ``rollback_from`` on that build."""
    out = [(o.manifest, o.to_build, counts_of(o))]
    if o.from_manifest is not None and o.from_manifest != o.manifest and o.from_build is not None:
        out.append((o.from_manifest, o.from_build, {"rollback_from": 1}))
    return sorted(out)


def summary(
    mid: bytes, app: str, build: int, counts: dict[str, int], last: float
) -> dict[str, Any]:
    """One build's tally as the API shows it: counts by kind, success rate, failure codes,
    rollbacks (``rollbacks_from``: attempts of nodes to roll back *from* this build, the
    figure that says it is bad; ``rollbacks_to``: attempts that landed on it, also under its
    old name ``rollbacks``), bytes by source and the mean duration of a success."""
    kinds: dict[str, dict[str, int]] = {}
    codes: dict[str, int] = {}
    for name, n in counts.items():
        what, _, label = name.partition(":")
        if what in ("ok", "fail"):
            k = kinds.setdefault(label, {"success": 0, "failure": 0})
            k["success" if what == "ok" else "failure"] += n
        elif what == "code":
            codes[label] = n
    ok = sum(k["success"] for k in kinds.values())
    failed = sum(k["failure"] for k in kinds.values())
    rollbacks = kinds.get("rollback", {"success": 0, "failure": 0})
    return {
        "manifest_id": mid.hex(),
        "app": app,
        "build": build,
        "reports": ok + failed,
        "success": ok,
        "failure": failed,
        "success_rate": ok / (ok + failed) if ok + failed else None,
        "by_kind": {k: kinds[k] for k in sorted(kinds)},
        "failure_codes": dict(sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "rollbacks_from": counts.get("rollback_from", 0),
        "rollbacks_to": rollbacks["success"] + rollbacks["failure"],
        "rollbacks": rollbacks["success"] + rollbacks["failure"],  # the old name of _to
        "bytes": {s: counts.get(f"bytes:{s}", 0) for s in SOURCES},
        "mean_success_s": round(counts.get("ms", 0) / ok / 1000, 3) if ok else None,
        "last_report": last,
    }


def series_counts(counts: dict[str, int]) -> dict[str, int]:
    """The counters of a build's tally (:func:`tallies_of`) that also go into its hourly
    series: ``ok`` (successes of any kind), ``code:CODE`` and ``rollback_from``."""
    out: dict[str, int] = {}
    for name, n in counts.items():
        if name.startswith("ok:"):
            out["ok"] = out.get("ok", 0) + n
        elif name.startswith("code:") or name == "rollback_from":
            out[name] = out.get(name, 0) + n
    return out


def series_view(rows: list[tuple[int, str, int]]) -> list[dict[str, Any]]:
    """A build's hourly series from its stored ``(hour, name, n)`` rows (hour: seconds since
    the epoch // SERIES_STEP), oldest first, hours without reports left out."""
    hours: dict[int, dict[str, Any]] = {}
    for hour, name, n in sorted(rows):
        h = hours.setdefault(
            hour,
            {"at": hour * SERIES_STEP, "success": 0, "failure": 0, "failure_codes": {},
             "rollbacks_from": 0},
        )  # fmt: skip
        if name == "ok":
            h["success"] += n
        elif name.startswith("code:"):
            h["failure"] += n
            h["failure_codes"][name[5:]] = n
        elif name == "rollback_from":
            h["rollbacks_from"] += n
    return [hours[k] for k in sorted(hours)]
