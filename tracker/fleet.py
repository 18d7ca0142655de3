"""The fleet view: which build of each app every node runs, in compact memory. No I/O here.

Theory of operation
-------------------
Announces and install outcomes already name a node, an app and a build; the fleet keeps the
latest of that per (node, app) *seat* (one node may run several apps), with the time it was
last seen, the node's p2pnode version (the optional announce field ``client``) and its last
install outcome. A node runs a build once it holds all of it: an announce with ``left == 0``
or a successful outcome says so; an announce still downloading only refreshes the last-seen
time (a new seat is counted as *updating* until it completes). A seat unseen for ``ttl``
seconds leaves the counts.

**Joins.** A seat made by a sighting that names no complete build (a node first seen still
downloading, or failing, its install) counts as a node joining the app's fleet: a running
total per app, sampled with the curves (``joined``), from which the load forecast reads the
rate new nodes arrive at (:func:`tracker.forecast.join_rate`). A node first seen with a whole
build (one that ran it before this fleet's memory began, or came back after its seat expired)
is not a join: that keeps a restarted tracker from reading its whole fleet as new.

Counts answer "how many nodes run each build" at once: every release and every client version
keeps a counter, moved when a seat changes build or version, so no view walks the seats. The
adoption curve of each build is those counters sampled once per ``bucket`` seconds, at most
``points`` samples per build.

Memory: the target is a million seats well within 1 GiB (``scripts/bench_fleet.py`` measures
it). So a seat is no object: its key (node id and a 2-byte app number, 22 bytes) maps to a slot
number in one dict, and the slot's fields live in parallel typed arrays (about 30 bytes); apps,
releases and client versions are small tables of their own, referred to by number. Freed slots
are reused. Expiry sweeps the slots a slice at a time (:meth:`MemoryFleet.gc`), so no call
walks a million seats at once; a seat may outlive its ``ttl`` by one full sweep.

Bounded: at most ``MAX_APPS`` apps, ``MAX_RELEASES`` tracked builds (a build no seat runs any
more is forgotten first), ``MAX_CLIENTS`` distinct client versions (later ones count as
``other``) and ``RECENT_OUTCOMES`` outcomes kept whole for the node view. Prometheus labels
come from these tables only, never from node ids.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from p2pnode.discovery.tracker_api import OUTCOME_CODES, OUTCOME_KINDS

__all__ = [
    "FLEET_TTL",
    "MAX_APPS",
    "MAX_CLIENTS",
    "MAX_RELEASES",
    "RECENT_OUTCOMES",
    "SERIES_BUCKET",
    "SERIES_POINTS",
    "FleetOutcome",
    "MemoryFleet",
    "Sighting",
]

#: A seat unseen this long (seconds) no longer counts: nodes announce every few minutes while
#: running, so three days tells a machine that was switched off from one that left.
FLEET_TTL = 3 * 24 * 3600
#: The adoption curve's resolution (seconds) and length (samples): a week of hours.
SERIES_BUCKET = 3600
SERIES_POINTS = 168
MAX_APPS = 4096
MAX_RELEASES = 20_000
MAX_CLIENTS = 1000
#: Whole outcomes kept for ``GET /v1/nodes/{id}`` (the seats keep their last one each).
RECENT_OUTCOMES = 20_000
#: Slots examined per :meth:`MemoryFleet.gc` call.
SWEEP_SLICE = 50_000
#: The client version of nodes older than the announce field, and of versions past the bound.
UNKNOWN_CLIENT = "unknown"
OTHER_CLIENT = "other"

_NONE = 0xFFFFFFFF  # no release (the seat is still downloading its first build)
_NO_OUTCOME = 0xFF
_SUCCESS = 0xFE


@dataclass(frozen=True, slots=True)
class Sighting:
    """What one announce or outcome tells the fleet: ``manifest``/``build`` is the build the
    node runs now (``None`` while it is still downloading), ``client`` its version."""

    node: bytes
    app: str
    manifest: bytes | None
    build: int | None
    client: str | None
    now: float


@dataclass(frozen=True, slots=True)
class FleetOutcome:
    """An accepted install outcome as the fleet keeps it."""

    node: bytes
    app: str
    manifest: bytes
    kind: str
    code: str | None  # None: success
    from_build: int | None
    to_build: int
    now: float

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "manifest_id": self.manifest.hex(),
            "kind": self.kind,
            "outcome": "success" if self.code is None else "failure",
            "code": self.code,
            "from_build": self.from_build,
            "to_build": self.to_build,
            "at": self.now,
        }


class _Release:
    """One build's counter and its sampled curve."""

    __slots__ = ("app", "build", "last_seen", "manifest", "nodes", "series")

    def __init__(self, app: int, manifest: bytes, build: int, points: int) -> None:
        self.app = app
        self.manifest = manifest
        self.build = build
        self.nodes = 0
        self.last_seen = 0.0
        self.series: deque[tuple[int, int]] = deque(maxlen=points)


class MemoryFleet:
    """Every seat of every app in compact arrays (see the module docstring)."""

    def __init__(
        self,
        *,
        ttl: float = FLEET_TTL,
        bucket: int = SERIES_BUCKET,
        points: int = SERIES_POINTS,
    ) -> None:
        self.ttl = ttl
        self.bucket = bucket
        self.points = points
        self._slot: dict[bytes, int] = {}
        self._keys: list[bytes | None] = []
        self._free: list[int] = []
        self._app = array("H")
        self._rel = array("I")
        self._client = array("H")
        self._seen = array("I")
        self._out_code = array("B")  # _NO_OUTCOME, _SUCCESS or an index of OUTCOME_CODES
        self._out_kind = array("B")
        self._out_at = array("I")
        self._out_build = array("q")
        self._apps: list[str] = []
        self._app_no: dict[str, int] = {}
        #: per app: seats still downloading their first build
        self._updating: list[int] = []
        #: per app: seats first seen with no complete build (joins), and that total sampled
        self._joined: list[int] = []
        self._joined_series: list[deque[tuple[int, int]]] = []
        self._releases: dict[int, _Release] = {}
        self._rel_no: dict[bytes, int] = {}
        self._next_rel = 0
        self._clients: list[str] = [UNKNOWN_CLIENT, OTHER_CLIENT]
        self._client_no: dict[str, int] = {UNKNOWN_CLIENT: 0, OTHER_CLIENT: 1}
        #: (app, client) -> seats
        self._client_count: dict[tuple[int, int], int] = {}
        self._recent: deque[FleetOutcome] = deque(maxlen=RECENT_OUTCOMES)
        self._sweep = 0
        self._sampled = -1

    def __len__(self) -> int:
        return len(self._slot)

    # ------------------------------------------------------------------ tables

    def _app_of(self, name: str) -> int | None:
        n = self._app_no.get(name)
        if n is None:
            if len(self._apps) >= MAX_APPS:
                return None
            n = self._app_no[name] = len(self._apps)
            self._apps.append(name)
            self._updating.append(0)
            self._joined.append(0)
            self._joined_series.append(deque(maxlen=self.points))
        return n

    def _release_of(self, app: int, manifest: bytes, build: int) -> int:
        n = self._rel_no.get(manifest)
        if n is not None:
            return n
        if len(self._releases) >= MAX_RELEASES and not self._forget_release():
            return _NONE
        n = self._next_rel
        self._next_rel = (n + 1) % _NONE
        self._releases[n] = _Release(app, manifest, build, self.points)
        self._rel_no[manifest] = n
        return n

    def _forget_release(self) -> bool:
        """Drop the build no seat runs that was seen longest ago; False if all are run."""
        idle = [(r.last_seen, n) for n, r in self._releases.items() if r.nodes == 0]
        if not idle:
            return False
        _, n = min(idle)
        del self._rel_no[self._releases.pop(n).manifest]
        return True

    def _client_of(self, version: str | None) -> int:
        if version is None:
            return 0
        n = self._client_no.get(version)
        if n is None:
            if len(self._clients) >= MAX_CLIENTS:
                return 1
            n = self._client_no[version] = len(self._clients)
            self._clients.append(version)
        return n

    def _count(self, app: int, rel: int, client: int, d: int) -> None:
        if rel == _NONE:
            self._updating[app] += d
        else:
            self._releases[rel].nodes += d
        key = (app, client)
        left = self._client_count.get(key, 0) + d
        if left:
            self._client_count[key] = left
        else:
            self._client_count.pop(key, None)

    # ------------------------------------------------------------------ changes

    def _seat(self, node: bytes, app: int, now: float) -> tuple[int, bool]:
        """The seat's slot, made (and counted as updating, unknown client) if new."""
        key = node + app.to_bytes(2, "big")
        slot = self._slot.get(key)
        if slot is not None:
            return slot, False
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = key
            self._app[slot] = app
            self._rel[slot] = _NONE
            self._client[slot] = 0
            self._out_code[slot] = _NO_OUTCOME
        else:
            slot = len(self._keys)
            self._keys.append(key)
            self._app.append(app)
            self._rel.append(_NONE)
            self._client.append(0)
            self._seen.append(0)
            self._out_code.append(_NO_OUTCOME)
            self._out_kind.append(0)
            self._out_at.append(0)
            self._out_build.append(0)
        self._slot[key] = slot
        self._count(app, _NONE, 0, 1)
        return slot, True

    def seen(self, s: Sighting) -> None:
        """A node was heard from: refresh its seat, and move it if its build or version
        changed (unchanged when ``s.manifest``/``s.client`` is ``None``)."""
        app = self._app_of(s.app)
        if app is None:
            return
        slot, new = self._seat(s.node, app, s.now)
        if new and s.manifest is None:
            self._joined[app] += 1
        rel, client = self._rel[slot], self._client[slot]
        new_rel = rel
        if s.manifest is not None and s.build is not None:
            new_rel = self._release_of(app, s.manifest, s.build)
        new_client = client if s.client is None else self._client_of(s.client)
        if new_rel != rel or new_client != client:
            self._count(app, rel, client, -1)
            self._count(app, new_rel, new_client, 1)
            self._rel[slot] = new_rel
            self._client[slot] = new_client
        self._seen[slot] = int(s.now)
        if new_rel != _NONE:
            r = self._releases[new_rel]
            r.last_seen = max(r.last_seen, s.now)

    def outcome(self, o: FleetOutcome) -> None:
        """An accepted outcome: the seat's last outcome; on success, the build it runs."""
        self.seen(
            Sighting(
                o.node,
                o.app,
                o.manifest if o.code is None else None,
                o.to_build if o.code is None else None,
                None,
                o.now,
            )
        )
        app = self._app_no.get(o.app)
        if app is None:
            return
        slot = self._slot[o.node + app.to_bytes(2, "big")]
        self._out_code[slot] = _SUCCESS if o.code is None else OUTCOME_CODES.index(o.code)
        self._out_kind[slot] = OUTCOME_KINDS.index(o.kind)
        self._out_at[slot] = int(o.now)
        self._out_build[slot] = o.to_build
        self._recent.append(o)

    def gc(self, now: float, budget: int = SWEEP_SLICE) -> int:
        """Sample the adoption curves when a bucket starts; expire the seats unseen for
        ``ttl`` among the next ``budget`` slots. How many seats went."""
        self.sample(now)
        n = len(self._keys)
        if not n:
            return 0
        gone = 0
        deadline = int(now - self.ttl)
        start = self._sweep % n
        stop = min(n, start + budget)
        for slot in range(start, stop):
            key = self._keys[slot]
            if key is not None and self._seen[slot] < deadline:
                self._count(self._app[slot], self._rel[slot], self._client[slot], -1)
                del self._slot[key]
                self._keys[slot] = None
                self._free.append(slot)
                gone += 1
        self._sweep = 0 if stop >= n else stop
        return gone

    def sample(self, now: float) -> None:
        """Append each build's seat count to its curve, once per bucket."""
        b = int(now) // self.bucket
        if b == self._sampled:
            return
        self._sampled = b
        at = b * self.bucket
        for r in self._releases.values():
            if r.nodes or r.series:
                r.series.append((at, r.nodes))
        for n, joined in enumerate(self._joined):
            self._joined_series[n].append((at, joined))

    # ------------------------------------------------------------------ views

    def apps(self) -> list[str]:
        return list(self._apps)

    def app_view(self, app: str, now: float) -> dict[str, Any] | None:
        """Per build: seats, share, last seen, curve (its samples, then now); client
        versions; seats updating."""
        n = self._app_no.get(app)
        if n is None:
            return None
        builds = [r for r in self._releases.values() if r.app == n and (r.nodes or r.series)]
        builds.sort(key=lambda r: -r.build)
        running = sum(r.nodes for r in builds)
        total = running + self._updating[n]
        clients = {
            self._clients[c]: k for (a, c), k in sorted(self._client_count.items()) if a == n
        }
        return {
            "app": app,
            "nodes": total,
            "updating": self._updating[n],
            "ttl_s": self.ttl,
            "bucket_s": self.bucket,
            "builds": [
                {
                    "manifest_id": r.manifest.hex(),
                    "build": r.build,
                    "nodes": r.nodes,
                    "share": r.nodes / total if total else 0.0,
                    "last_seen": r.last_seen,
                    "adoption": [*(list(p) for p in r.series), [int(now), r.nodes]],
                }
                for r in builds
            ],
            "clients": dict(sorted(clients.items(), key=lambda kv: -kv[1])),
            "joined": [*(list(p) for p in self._joined_series[n]), [int(now), self._joined[n]]],
        }

    def node_view(self, node: bytes) -> dict[str, Any] | None:
        """What one node runs in each app, when it was last seen, and its recent outcomes."""
        seats = []
        for app, n in self._app_no.items():
            slot = self._slot.get(node + n.to_bytes(2, "big"))
            if slot is None:
                continue
            rel = self._releases.get(self._rel[slot]) if self._rel[slot] != _NONE else None
            code = self._out_code[slot]
            last = None
            if code != _NO_OUTCOME:
                last = {
                    "kind": OUTCOME_KINDS[self._out_kind[slot]],
                    "outcome": "success" if code == _SUCCESS else "failure",
                    "code": None if code == _SUCCESS else OUTCOME_CODES[code],
                    "to_build": self._out_build[slot],
                    "at": self._out_at[slot],
                }
            seats.append(
                {
                    "app": app,
                    "manifest_id": rel.manifest.hex() if rel else None,
                    "build": rel.build if rel else None,
                    "client": self._clients[self._client[slot]],
                    "last_seen": self._seen[slot],
                    "expires": self._seen[slot] + self.ttl,
                    "last_outcome": last,
                }
            )
        if not seats:
            return None
        recent = [o.to_json() for o in reversed(self._recent) if o.node == node][:20]
        return {"node_id": node.hex(), "apps": seats, "recent_outcomes": recent}

    def gauges(self) -> dict[str, Any]:
        """Seats per build and per client version, for ``/metrics`` (bounded labels)."""
        return {
            "builds": [
                (self._apps[r.app], r.manifest.hex(), r.build, r.nodes)
                for r in self._releases.values()
                if r.nodes
            ],
            "clients": [
                (self._apps[a], self._clients[c], k) for (a, c), k in self._client_count.items()
            ],
            "updating": [(name, self._updating[n]) for name, n in self._app_no.items()],
        }
