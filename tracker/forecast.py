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
   not fetched: the patch is, and patch bytes are forecast apart (``patches_total``, every
   adopter fetching its patches), because nodes report them apart (from peers or the CDN, not
   split) while their announces count chunk bytes only: the CDN figures here are chunk bytes,
   so that the forecast and what followed are measured alike.
3. **Adoption shape** ``F(k)``: the share of a release's adopters done ``k`` minutes after its
   publish, averaged over up to ``HISTORY`` recent releases of the app from their per-minute
   completions (:mod:`tracker.traffic`); a release's share counts as complete past its last
   minute. Without history: ``1 - exp(-(k+1)/DEFAULT_TAU_MIN)``.
4. **Offload** ``r(f)``: the share of bytes peers served while a release's adoption was in each
   of ``BINS`` quarters (``f`` = its adopted share then), pooled over the same releases; a
   quarter with no bytes takes the pooled ratio, and no history at all gives 0 (every byte
   from the CDN: the safe side of a cost estimate).

Minute ``k`` then costs ``N * B * (F(k) - F(k-1)) * (1 - r(F(k-1)))`` of CDN egress; the
forecast is their sum and its largest minute (the peak), over ``HORIZON_MIN`` minutes (the
rest of the adoption, if any, is added to the total at the end's offload). Past releases
count their bytes at the minute nodes announced them (roughly when fetched), which is also
how the actual series is measured, so the comparison (:func:`compare`) is like for like.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from p2pnode.release.manifest import Manifest

__all__ = [
    "BINS",
    "DEFAULT_TAU_MIN",
    "HISTORY",
    "HORIZON_MIN",
    "PastRelease",
    "bytes_needed",
    "compare",
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
MODEL = "adoption-offload-1"


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
) -> dict[str, Any]:
    """The forecast of a publish at ``published`` (Unix s); see the module docstring."""
    adopters = nodes * percent / 100
    f, builds = _shape(history, published)
    offload = _offload(history, builds) if builds else [0.0] * BINS
    start = int(published) // 60
    curve: list[list[int]] = []
    total_cdn = total_peers = 0.0
    peak, peak_at, prev = 0.0, start * 60, 0.0
    for k in range(HORIZON_MIN):
        r = offload[min(BINS - 1, int(BINS * prev))]
        fetched = adopters * need * max(0.0, f[k] - prev)
        cdn = fetched * (1 - r)
        total_cdn += cdn
        total_peers += fetched - cdn
        if cdn > peak:
            peak, peak_at = cdn, (start + k) * 60
        if cdn >= 0.5:
            curve.append([(start + k) * 60, round(cdn)])
        prev = f[k]
    if prev < 1:  # adoption beyond the horizon, at the last quarter's offload
        rest = adopters * need * (1 - prev)
        total_cdn += rest * (1 - offload[-1])
        total_peers += rest * offload[-1]
    return {
        "model": MODEL,
        "at": published,
        "nodes": nodes,
        "percent": percent,
        "adopters": adopters,
        "size_bytes": size,
        "need_bytes": round(need),
        "patch_need_bytes": round(patch_need),
        "patches_total": round(adopters * patch_need),
        "basis": "history" if builds else "default",
        "history_builds": builds,
        "offload": [round(x, 4) for x in offload],
        "cdn_total": round(total_cdn),
        "peers_total": round(total_peers),
        "cdn_peak_per_min": round(peak),
        "cdn_peak_at": peak_at,
        "curve": curve,
    }


def compare(forecast: dict[str, Any], rows: Sequence[dict[str, int]], now: float) -> dict[str, Any]:
    """What followed a forecast: the actual CDN egress per minute since the publish beside the
    predicted one, their totals so far, the peaks and their ratios (actual / predicted)."""
    start = int(forecast["at"]) // 60 * 60
    actual = [[r["t"], r["cdn"]] for r in sorted(rows, key=lambda r: r["t"]) if r["t"] >= start]
    predicted_so_far = sum(b for t, b in forecast["curve"] if t <= now)
    if now >= start + HORIZON_MIN * 60:
        predicted_so_far = forecast["cdn_total"]
    actual_total = sum(b for _, b in actual)
    patches = sum(r.get("patches", 0) for r in rows if r["t"] >= start)
    peak_at, peak = max(((t, b) for t, b in actual), key=lambda x: x[1], default=(None, 0))

    def ratio(a: float, p: float) -> float | None:
        return round(a / p, 4) if p else None

    return {
        "elapsed_s": max(0, int(now) - start),
        "actual": actual,
        "cdn_actual_total": actual_total,
        "patches_actual_total": patches,
        "cdn_predicted_so_far": round(predicted_so_far),
        "cdn_actual_peak_per_min": peak,
        "cdn_actual_peak_at": peak_at,
        "total_ratio": ratio(actual_total, predicted_so_far),
        "peak_ratio": ratio(peak, forecast["cdn_peak_per_min"]),
    }
