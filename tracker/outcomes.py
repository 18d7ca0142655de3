"""Install outcomes: what nodes say became of each install, update, repair and rollback.

Theory of operation
-------------------
A node sends one signed ``POST /v1/outcomes`` per attempt (docs/tracker-api.md): the kind,
success or a failure code from the shared list (``tracker_api.OUTCOME_CODES``), its duration,
its bytes by source, and the builds it went from and to. :func:`parse_outcome` verifies and
checks it as :func:`tracker.core.parse_report` does a report (signature, clock skew, nonce);
:class:`OutcomeTally` folds accepted outcomes into per-build counters: success rate, failure
codes, rollbacks, bytes. It does no I/O.

Bounded: at most ``MAX_RELEASES`` builds are tallied (the least recently reported goes
first), every label is from a closed list, and the replay guard keeps at most ``MAX_SEEN``
signatures for ``2 * MAX_SKEW`` seconds (the app also rate-limits each node). The tally lives
in the memory of the process that received the outcomes: each replica counts its own (sum
``tracker_install_outcomes_total`` across replicas), and a restart starts from zero.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from p2pnode.discovery.tracker_api import OUTCOME_CODES, OUTCOME_DOMAIN, OUTCOME_KINDS
from p2pnode.release import keys

from .core import (
    MAX_BYTES,
    MAX_SKEW,
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
    "MAX_SEEN",
    "Outcome",
    "OutcomeTally",
    "parse_outcome",
]

MAX_OUTCOME_BYTES = 2048
#: Builds tallied at most; reporting on another drops the least recently reported one.
MAX_RELEASES = 2000
#: Replay digests remembered at most (each for ``2 * MAX_SKEW`` seconds).
MAX_SEEN = 200_000
#: The longest attempt an outcome may report (a week, in milliseconds).
MAX_DURATION_MS = 7 * 24 * 3600 * 1000
MAX_BUILD = (1 << 63) - 1
#: Sources of an attempt's bytes, as the body names them (``bytes_<source>``).
SOURCES = ("peers", "cdn", "reused", "patches")

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
    bytes: tuple[int, int, int, int]  # by SOURCES


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

    def n(source: str) -> int:
        return _int(obj, f"bytes_{source}", 0, MAX_BYTES, 0)

    return Outcome(
        node_id=node_id,
        app=_name(obj, "app"),
        manifest=_hex_id(obj, "manifest"),
        kind=kind,
        code=code,
        duration_ms=_int(obj, "duration_ms", 0, MAX_DURATION_MS, 0),
        from_build=_int(obj, "from_build", 0, MAX_BUILD) if "from_build" in obj else None,
        to_build=_int(obj, "to_build", 0, MAX_BUILD),
        bytes=(n("peers"), n("cdn"), n("reused"), n("patches")),
    )


@dataclass
class _Build:
    """The tally of one build (manifest)."""

    app: str
    build: int
    #: kind -> [successes, failures]
    kinds: dict[str, list[int]] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    bytes: list[int] = field(default_factory=lambda: [0] * len(SOURCES))
    duration_ms: int = 0  # summed over successes
    last: float = 0.0


class OutcomeTally:
    """Per-build counters of accepted outcomes, and the replay guard (see the module
    docstring)."""

    def __init__(self) -> None:
        self._builds: OrderedDict[bytes, _Build] = OrderedDict()
        self._seen: dict[bytes, float] = {}
        self._seen_order: deque[tuple[float, bytes]] = deque()

    def fresh(self, digest: bytes, now: float) -> bool:
        """Remember ``digest`` for ``2 * MAX_SKEW`` s; False if it is already remembered (a
        replay). Past ``MAX_SEEN`` the oldest go early (``_ts`` still refuses stale ones)."""
        order = self._seen
        while self._seen_order and (self._seen_order[0][0] <= now or len(order) >= MAX_SEEN):
            _, old = self._seen_order.popleft()
            order.pop(old, None)
        if digest in order:
            return False
        order[digest] = now + 2 * MAX_SKEW
        self._seen_order.append((now + 2 * MAX_SKEW, digest))
        return True

    def add(self, o: Outcome, now: float) -> None:
        b = self._builds.pop(o.manifest, None)
        if b is None:
            b = _Build(o.app, o.to_build)
            while len(self._builds) >= MAX_RELEASES:
                self._builds.popitem(last=False)
        self._builds[o.manifest] = b  # the most recently reported last
        counts = b.kinds.setdefault(o.kind, [0, 0])
        if o.code is None:
            counts[0] += 1
            b.duration_ms += o.duration_ms
        else:
            counts[1] += 1
            b.codes[o.code] = b.codes.get(o.code, 0) + 1
        for i, n in enumerate(o.bytes):
            b.bytes[i] += n
        b.last = now

    def stats(self, app: str | None = None) -> list[dict[str, Any]]:
        """Per build (newest report first): counts by kind, success rate, failure codes,
        bytes by source and the mean duration of a success."""
        out = []
        for mid, b in reversed(self._builds.items()):
            if app is not None and b.app != app:
                continue
            ok = sum(k[0] for k in b.kinds.values())
            failed = sum(k[1] for k in b.kinds.values())
            out.append(
                {
                    "manifest_id": mid.hex(),
                    "app": b.app,
                    "build": b.build,
                    "reports": ok + failed,
                    "success": ok,
                    "failure": failed,
                    "success_rate": ok / (ok + failed) if ok + failed else None,
                    "by_kind": {k: {"success": v[0], "failure": v[1]} for k, v in b.kinds.items()},
                    "failure_codes": dict(sorted(b.codes.items(), key=lambda kv: -kv[1])),
                    "bytes": dict(zip(SOURCES, b.bytes, strict=True)),
                    "mean_success_s": round(b.duration_ms / ok / 1000, 3) if ok else None,
                    "last_report": b.last,
                }
            )
        return out
