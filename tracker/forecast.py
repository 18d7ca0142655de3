"""What a publish will cost the CDN: a forecast from the fleet and past releases. No I/O here.

Theory of operation
-------------------
Three things decide a publish's CDN egress: how many nodes will take the build, how many bytes
each one lacks, and what share of those bytes the swarm serves instead of the CDN, which
depends on how far the release has spread when a node fetches (the first nodes find no peer
holding the build; the last find many). So:

1. **Adopters** ``N``: the nodes of the channel's fleet (the fleet view's nodes whose build is
   one the channel carried), times the rollout's percentage.
2. **Need** ``B``: per build the fleet runs, the bytes of the new build's distinct chunks that
   build lacks; :func:`bytes_needed` averages them over the nodes. Nodes on a build the
   tracker cannot read need the whole build. A chunk a listed patch makes from that build is
   not fetched: the patch is (``P`` patch bytes per node, on average). Patches come from
   peers or the CDN like chunks, and nodes count them in the ``from_peers`` / ``from_cdn``
   they announce, so a node fetches ``B + P`` bytes at the swarm's offload and the CDN figures
   here are the CDN's whole egress, chunks and patches, which is what the series' ``cdn``
   column measures; ``cdn_patches_total`` says how much of it is patches (the series'
   ``patches_cdn``), ``patches_total`` all patch bytes, from peers or the CDN.
3. **Adoption shape** ``F(k)``: the share of a release's adopters done ``k`` minutes after its
   publish, averaged over up to ``HISTORY`` recent releases of the app from their per-minute
   completions (:mod:`tracker.traffic`); a release's share counts as complete past its last
   minute. Without history: ``1 - exp(-(k+1)/DEFAULT_TAU_MIN)``.
4. **Offload** ``r(f)``: the share of bytes peers served while a release's adoption was in each
   of ``BINS`` quarters (``f`` = its adopted share then), pooled over the same releases; a
   quarter with no bytes takes the pooled ratio, and no history at all gives 0 (every byte
   from the CDN: the safe side of a cost estimate).

5. **Late joiners** ``J``: nodes that join the fleet during the horizon (new machines, ones
   back after the fleet view forgot them) fetch the whole build, ``size`` bytes, not a delta.
   Their rate is the fleet view's first-seen rate over its recent past (:func:`join_rate`: seats
   first seen still downloading, per minute), times the channel's share of the app's nodes;
   each minute's joiners fetch at that minute's offload.

Minute ``k`` then costs ``(N * (B + P) * (F(k) - F(k-1)) + J * size) * (1 - r(F(k-1)))`` of CDN
egress; the forecast is their sum and its largest minute (the peak), over ``HORIZON_MIN``
minutes (the rest of the adoption, if any, is added to the total at the end's offload; joiners
past the horizon are not). Past releases count their bytes at the minute nodes announced them
(roughly when fetched), which is also how the actual series is measured, so the comparison
(:func:`compare`) is like for like. Forecasts made before the model counted patches (model
``adoption-offload-2``: ``cdn_total`` in chunk bytes) are compared with the series' chunk
bytes, ``cdn - patches_cdn``.

Events
------
A forecast is made for each event that starts nodes fetching a build: its publish, its promote
to another channel (another fleet), and each raise of its staged rollout (``was_percent`` to
``percent``: only the nodes the raise lets in, ``N * (percent - was_percent) / 100``, where
``N`` counts the nodes already on the build too, since the rollout's hash spans them all).
What followed an event is the build's series from it to the build's next event
(:func:`compare`'s ``until``): the series is per build, not per event.

Mirrors
-------
The CDN egress is split per mirror the way a node spreads its requests
(:mod:`p2pnode.cdn.plan`): each fetch starts a fresh plan whose mirrors all look alike, and
each request goes to the least busy mirror, ties to the first in the manifest's order; so a
fetch's requests (``max(REQUEST, chunk)`` bytes each) go round the first ``min(mirrors,
CONNECTIONS)`` mirrors in turn, and a small fetch touches only the first few
(:func:`mirror_shares`). Upgraders' shares come from their need per base build, joiners' from
the whole build. This assumes nodes list the manifest's mirrors only (no ``--mirror`` of their
own, no manifest fetched from a mirror's URL, which would come first) and mirrors of like speed
(a faster one takes more); swarm-assisted fetches come in smaller batches, each starting again
at the first mirror, so the first mirror's share is, if anything, low.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from p2pnode.cdn.plan import PlanParams
from p2pnode.release.manifest import Manifest

__all__ = [
    "BINS",
    "CHUNKS_ONLY_MODEL",
    "CONNECTIONS",
    "DEFAULT_TAU_MIN",
    "EVENTS",
    "HISTORY",
    "HORIZON_MIN",
    "JOIN_WINDOW_S",
    "MAX_FORECASTS",
    "REQUEST",
    "PastRelease",
    "bytes_needed",
    "compare",
    "join_rate",
    "mirror_shares",
    "mirror_split",
    "predict",
]

#: Adoption quarters that get an offload ratio each.
BINS = 4
#: Releases of the app the shape and offload come from (the most recent first).
HISTORY = 5
#: Minutes the forecast curve covers (a day; the total covers the rest too).
HORIZON_MIN = 24 * 60
#: The adoption time constant without history (minutes): a placeholder until the tracker has
#: seen one release of the app.
DEFAULT_TAU_MIN = 60.0
#: Past releases published this recently are used only when no older one is there: their
#: curve is cut short, so it reads as faster than it will be.
SETTLED_MIN = 24 * 60
MODEL = "adoption-offload-3"
#: The model before the CDN figures counted patches (its ``cdn_total`` is chunk bytes).
CHUNKS_ONLY_MODEL = "adoption-offload-2"
#: What a forecast is made at (:mod:`tracker.load_http`).
EVENTS = ("publish", "promote", "rollout-raise", "rollout-complete")
#: Forecasts (events) a traffic store keeps at most, the oldest going first: a build has a
#: few (publish, promotes, raises), and ``MAX_BUILDS`` builds keep a series.
MAX_FORECASTS = 8000
#: A node's concurrent CDN requests, and the size of its first ones (``PlanParams``'
#: defaults: ``p2pnode --connections``, the initial budget shared among them).
CONNECTIONS = PlanParams.connections
REQUEST = max(256 * 1024, PlanParams.initial_budget // PlanParams.connections)
#: The recent past the join rate is measured over (the fleet view keeps a week of hours), and
#: the least of it that says anything.
JOIN_WINDOW_S = 7 * 86400
MIN_JOIN_SPAN_S = 3600


@dataclass(frozen=True, slots=True)
class PastRelease:
    """A published build's series: ``rows`` as :func:`tracker.traffic.per_minute` gives
    them, ``published`` its publish time (Unix s)."""

    build: int
    published: float
    rows: Sequence[dict[str, int]]

    def completions(self) -> int:
        return sum(r["completed"] for r in self.rows)


def bytes_needed(new: Manifest, fleet: Iterable[tuple[Manifest | None, int]]) -> dict[str, Any]:
    """What one node lacks of ``new``, averaged over ``fleet`` ((the build it runs, nodes)):
    ``need`` in chunk bytes, ``patch_need`` in patch bytes (see the module docstring);
    ``per_build`` lists each base build's."""
    chunks = new.unique_chunks()
    size = sum(chunks.values())
    total = patched = nodes = 0
    per_build = []
    for base, n in fleet:
        need, patches = (size, 0) if base is None else _need_from(new, chunks, base)
        per_build.append(
            {"build": None if base is None else base.build, "nodes": n, "need": need,
             "patches": patches}
        )  # fmt: skip
        total += need * n
        patched += patches * n
        nodes += n
    return {
        "size": size,
        "chunk": size / len(chunks) if chunks else 0.0,
        "need": total / nodes if nodes else float(size),
        "patch_need": patched / nodes if nodes else 0.0,
        "per_build": per_build,
    }


def _need_from(new: Manifest, chunks: dict[bytes, int], base: Manifest) -> tuple[int, int]:
    """(chunk bytes, patch bytes) a node running ``base`` fetches for ``new``."""
    have = base.unique_chunks()
    missing = {cid: n for cid, n in chunks.items() if cid not in have}
    files = {f.path: f for f in new.files}
    patched = 0
    for p in new.patches:
        if p.base != base.id or p.path not in files:
            continue
        made = [c.id for c in files[p.path].chunks[p.first : p.first + p.count]]
        if any(cid in missing for cid in made):
            patched += p.size
            for cid in made:
                missing.pop(cid, None)
    return sum(missing.values()), patched


def mirror_shares(fetched: float, mirrors: int, chunk: float = 0.0) -> list[float]:
    """The share of one fetch of ``fetched`` bytes each of ``mirrors`` serves (see the module
    docstring): its requests (``max(REQUEST, chunk)`` bytes each) dealt in turn over the first
    ``min(mirrors, CONNECTIONS)`` mirrors."""
    if mirrors <= 0:
        return []
    jobs = max(1, math.ceil(fetched / max(REQUEST, chunk, 1.0)))
    used = min(mirrors, CONNECTIONS)
    return [
        (jobs // used + (1 if q < jobs % used else 0)) / jobs if q < used else 0.0
        for q in range(mirrors)
    ]


def mirror_split(need: dict[str, Any], mirrors: int) -> tuple[list[float], list[float]]:
    """Per mirror, the share of the upgraders' chunk bytes (each base build's need weighted by
    its nodes) and of a joiner's whole-build fetch, from :func:`bytes_needed`'s answer."""
    whole = mirror_shares(need["size"], mirrors, need["chunk"])
    weights = [(b["nodes"] * b["need"], b["need"]) for b in need["per_build"]]
    total = sum(w for w, _ in weights)
    if not total:
        return whole, whole
    split = [0.0] * mirrors
    for w, n in weights:
        for q, x in enumerate(mirror_shares(n, mirrors, need["chunk"])):
            split[q] += w / total * x
    return split, whole


def join_rate(points: Sequence[Sequence[float]], now: float) -> float:
    """Nodes joining per minute over the last ``JOIN_WINDOW_S``, from the fleet view's
    ``joined`` points ((time, seats first seen so far)); 0 over less than ``MIN_JOIN_SPAN_S``.
    A running total that fell (a store that started again) counts from its new value."""
    recent = sorted((t, n) for t, n in points if now - JOIN_WINDOW_S <= t <= now)
    if len(recent) < 2 or recent[-1][0] - recent[0][0] < MIN_JOIN_SPAN_S:
        return 0.0
    joined = sum(max(0.0, b - a) for (_, a), (_, b) in itertools.pairwise(recent))
    return 60 * joined / (recent[-1][0] - recent[0][0])


def _shape(history: Sequence[PastRelease], now: float) -> tuple[list[float], list[int]]:
    """F(k) for k < HORIZON_MIN (and 1 past it), and which builds it came from."""
    usable = [p for p in history if p.completions() > 0]
    settled = [p for p in usable if now - p.published >= SETTLED_MIN * 60]
    chosen = sorted(settled or usable, key=lambda p: -p.published)[:HISTORY]
    if not chosen:
        f = [1 - math.exp(-(k + 1) / DEFAULT_TAU_MIN) for k in range(HORIZON_MIN)]
        return f, []
    curves = [_cumulative(p) for p in chosen]
    f = [sum(c[k] for c in curves) / len(curves) for k in range(HORIZON_MIN)]
    return f, [p.build for p in chosen]


def _cumulative(p: PastRelease) -> list[float]:
    """The release's adopted share by minute since its publish (1 past its last row)."""
    total = p.completions()
    per = [0] * HORIZON_MIN
    late = 0
    start = int(p.published) // 60
    for r in p.rows:
        k = max(0, r["t"] // 60 - start)
        if k < HORIZON_MIN:
            per[k] += r["completed"]
        else:
            late += r["completed"]
    out, done = [], 0
    last = max((r["t"] // 60 - start for r in p.rows), default=0)
    for k in range(HORIZON_MIN):
        done += per[k]
        out.append(1.0 if k >= last and not late else done / total)
    return out


def _offload(history: Sequence[PastRelease], builds: Sequence[int]) -> list[float]:
    """The peers' share of bytes per adoption quarter, pooled over ``builds``."""
    peers, cdn = [0] * BINS, [0] * BINS
    for p in history:
        if p.build not in builds:
            continue
        total, done = p.completions(), 0
        for r in sorted(p.rows, key=lambda r: r["t"]):
            b = min(BINS - 1, int(BINS * done / total))
            peers[b] += r["peers"]
            cdn[b] += r["cdn"]
            done += r["completed"]
    pooled = sum(peers) / (sum(peers) + sum(cdn)) if sum(peers) + sum(cdn) else 0.0
    return [p / (p + c) if p + c else pooled for p, c in zip(peers, cdn, strict=True)]


def predict(
    *,
    nodes: int,
    need: float,
    size: int,
    history: Sequence[PastRelease],
    published: float,
    percent: float = 100.0,
    patch_need: float = 0.0,
    was_percent: float = 0.0,
    joiners_per_min: float = 0.0,
    mirrors: Sequence[str | None] = (None,),
    split: Sequence[float] = (1.0,),
    whole_split: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """The forecast of an event at ``published`` (Unix s) that lets ``percent - was_percent``
    of the channel's ``nodes`` (and of its joiners) take the build; ``mirrors`` with the
    shares of :func:`mirror_split` (``None``: the mirrors nodes were given, when the manifest
    lists none). See the module docstring."""
    share = max(0.0, percent - was_percent) / 100
    adopters = nodes * share
    joining = joiners_per_min * share
    f, builds = _shape(history, published)
    offload = _offload(history, builds) if builds else [0.0] * BINS
    start = int(published) // 60
    curve: list[list[int]] = []
    fetch = need + patch_need  # what one upgrader fetches, chunks and patches alike
    total_cdn = total_peers = joiners_cdn = patches_cdn = 0.0
    peak, peak_at, prev = 0.0, start * 60, 0.0
    per_mirror = [[0.0, 0.0, start * 60] for _ in mirrors]  # total, peak, peak at
    for k in range(HORIZON_MIN):
        r = offload[min(BINS - 1, int(BINS * prev))]
        upgrade = adopters * fetch * max(0.0, f[k] - prev)
        join = joining * size
        cdn = (upgrade + join) * (1 - r)
        total_cdn += cdn
        total_peers += upgrade + join - cdn
        joiners_cdn += join * (1 - r)
        patches_cdn += adopters * patch_need * max(0.0, f[k] - prev) * (1 - r)
        if cdn > peak:
            peak, peak_at = cdn, (start + k) * 60
        for m, s, w in zip(per_mirror, split, whole_split, strict=True):
            here = (upgrade * s + join * w) * (1 - r)
            m[0] += here
            if here > m[1]:
                m[1], m[2] = here, (start + k) * 60
        if cdn >= 0.5:
            curve.append([(start + k) * 60, round(cdn)])
        prev = f[k]
    if prev < 1:  # adoption beyond the horizon, at the last quarter's offload
        rest = adopters * fetch * (1 - prev)
        total_cdn += rest * (1 - offload[-1])
        patches_cdn += adopters * patch_need * (1 - prev) * (1 - offload[-1])
        total_peers += rest * offload[-1]
        for m, s in zip(per_mirror, split, strict=True):
            m[0] += rest * s * (1 - offload[-1])
    return {
        "model": MODEL,
        "at": published,
        "nodes": nodes,
        "percent": percent,
        "was_percent": was_percent,
        "adopters": adopters,
        "size_bytes": size,
        "need_bytes": round(need),
        "patch_need_bytes": round(patch_need),
        "patches_total": round(adopters * patch_need),
        "join_rate_per_hour": round(60 * joiners_per_min, 4),
        "joiners": round(joining * HORIZON_MIN, 2),
        "joiners_cdn_total": round(joiners_cdn),
        "basis": "history" if builds else "default",
        "history_builds": builds,
        "offload": [round(x, 4) for x in offload],
        "cdn_total": round(total_cdn),
        "cdn_chunks_total": round(total_cdn - patches_cdn),
        "cdn_patches_total": round(patches_cdn),
        "peers_total": round(total_peers),
        "cdn_peak_per_min": round(peak),
        "cdn_peak_at": peak_at,
        "mirrors": [
            _mirror(url, m, s, total_cdn)
            for url, m, s in zip(mirrors, per_mirror, split, strict=True)
        ],
        "curve": curve,
    }


def _mirror(url: str | None, m: list[float], share: float, total: float) -> dict[str, Any]:
    """One mirror's part of a forecast: ``m`` is its (CDN total, peak, peak at)."""
    return {
        "url": url,
        "share": round(m[0] / total if total else share, 4),
        "cdn_total": round(m[0]),
        "cdn_peak_per_min": round(m[1]),
        "cdn_peak_at": int(m[2]),
    }


def compare(
    forecast: dict[str, Any], rows: Sequence[dict[str, int]], now: float, until: float | None = None
) -> dict[str, Any]:
    """What followed a forecast: the actual CDN egress per minute since its event beside the
    predicted one (up to ``until``, the build's next event, if any), their totals so far, the
    peaks and their ratios (actual / predicted). The actual egress is the series' ``cdn``
    (chunks and patches), or its chunk bytes for a forecast of ``CHUNKS_ONLY_MODEL``."""
    start = int(forecast["at"]) // 60 * 60
    end = math.inf if until is None else int(until) // 60 * 60
    now = min(now, end - 1)
    rows = [r for r in rows if start <= r["t"] < end]
    chunks_only = forecast.get("model") == CHUNKS_ONLY_MODEL
    actual = [
        [r["t"], r["cdn"] - (r.get("patches_cdn", 0) if chunks_only else 0)]
        for r in sorted(rows, key=lambda r: r["t"])
    ]
    predicted_so_far = sum(b for t, b in forecast["curve"] if t <= now)
    if now >= start + HORIZON_MIN * 60:
        predicted_so_far = forecast["cdn_total"]
    actual_total = sum(b for _, b in actual)
    patches = sum(r.get("patches", 0) for r in rows)
    patches_cdn = sum(r.get("patches_cdn", 0) for r in rows)
    peak_at, peak = max(((t, b) for t, b in actual), key=lambda x: x[1], default=(None, 0))

    def ratio(a: float, p: float) -> float | None:
        return round(a / p, 4) if p else None

    return {
        "elapsed_s": max(0, int(now) - start),
        "actual": actual,
        "cdn_actual_total": actual_total,
        "patches_actual_total": patches,
        "cdn_patches_actual_total": patches_cdn,
        "cdn_predicted_so_far": round(predicted_so_far),
        "cdn_actual_peak_per_min": peak,
        "cdn_actual_peak_at": peak_at,
        "total_ratio": ratio(actual_total, predicted_so_far),
        "peak_ratio": ratio(peak, forecast["cdn_peak_per_min"]),
    }
