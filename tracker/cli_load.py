"""``tracker forecast``: a publish's CDN forecast beside what followed, or a dry run.

    tracker forecast show APP BUILD --url URL [--json]
    tracker forecast dry-run APP CHANNEL MANIFEST --url URL [--token T] [--rollout P] [--json]

``show`` prints the forecasts recorded at the build's events (its publish, promotes, rollout
raises) and, minute by minute, the CDN egress each predicted beside what nodes reported until
the next, with the split per mirror and the late joiners' part; ``dry-run`` uploads a signed
manifest (``p2pnode publish --out DIR`` writes it as ``DIR/APP/BUILD/manifest.p2pm``) and
prints what publishing it now would cost, storing nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.errors import UsageError
from p2pnode.units import format_bytes, format_count

__all__ = ["add_parser", "forecast_verb", "print_forecast"]


def add_parser(sub: Any) -> None:
    f = sub.add_parser("forecast", help="a publish's CDN egress forecast (and what followed)")
    fsub = f.add_subparsers(dest="forecast_command", required=True)
    show = fsub.add_parser("show", help="the forecast recorded at a publish, beside what followed")
    show.add_argument("app")
    show.add_argument("build", type=int)
    dry = fsub.add_parser("dry-run", help="what publishing a signed manifest now would cost")
    dry.add_argument("app")
    dry.add_argument("channel")
    dry.add_argument("manifest", type=Path, help="the signed manifest file (manifest.p2pm)")
    dry.add_argument("--token", help="publisher or admin token (or TRACKER_ADMIN_TOKEN)")
    dry.add_argument("--rollout", type=float, help="the staged rollout's percentage")
    for p in (show, dry):
        p.add_argument("--url", required=True)
        p.add_argument("--json", action="store_true")


async def forecast_verb(args: argparse.Namespace) -> dict[str, Any]:
    if args.forecast_command == "show":
        async with TrackerClient(args.url) as client:
            path = f"/v1/apps/{args.app}/builds/{args.build}/forecast"
            return dict((await client._request("GET", path)).json())
    try:
        body = args.manifest.read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read {args.manifest}: {exc.strerror}",
            fix="pass the manifest.p2pm that `p2pnode publish --out` wrote",
        ) from exc
    token = args.token or os.environ.get("TRACKER_ADMIN_TOKEN")
    async with TrackerClient(args.url, token=token) as client:
        resp = await client._request(
            "POST",
            f"/v1/apps/{args.app}/channels/{args.channel}/forecast",
            content=body,
            headers={"Content-Type": "application/x-p2pnode-manifest"},
            params=None if args.rollout is None else {"rollout": args.rollout},
            auth=True,
        )
        return {"forecast": resp.json(), "actual": None}


def utc_minute(t: float | None) -> str:
    """A Unix time to the minute in UTC, for people (``-``: none)."""
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + "Z"


def _what(f: dict[str, Any], dry: bool = False) -> str:
    """The event a forecast was made at, in words (a dry run's build was not published)."""
    event = f.get("event")
    if dry:
        return f"if published now ({utc_minute(f['at'])})"
    if event == "promote":
        return f"promoted {utc_minute(f['at'])}"
    if event == "rollout-raise":
        return f"rollout raised {f['was_percent']:g}% -> {f['percent']:g}% {utc_minute(f['at'])}"
    if event == "rollout-complete":
        return f"rollout completed ({f['was_percent']:g}% -> 100%) {utc_minute(f['at'])}"
    return f"published {utc_minute(f['at'])}"


def _basis(f: dict[str, Any]) -> str:
    """Where a forecast's adoption shape and offload came from, in words."""
    builds = f.get("history_builds") or []
    if f.get("basis") == "default" or not builds:
        return "no earlier release measured: assumes no offload, every byte from the CDN"
    return (
        "shape and offload as measured for build"
        + ("s " if len(builds) > 1 else " ")
        + (", ".join(map(str, builds)))
    )


def _fetch_per_node(f: dict[str, Any]) -> str:
    """What one adopter fetches: chunk bytes, and the delta patches' if any."""
    patches = f.get("patch_need_bytes", 0)
    chunks = format_bytes(f["need_bytes"])
    if not patches:
        return f"{chunks} each"
    return f"{chunks} of chunks + {format_bytes(patches)} of delta patches each"


def print_forecast(out: dict[str, Any]) -> None:
    """A dry run's forecast, or every event's of ``show`` beside what followed it."""
    reports = out.get("events") or [{"forecast": out["forecast"], "actual": out["actual"]}]
    for i, r in enumerate(reports):
        if i:
            print()
        _print_one(r["forecast"], r["actual"])


def _print_one(f: dict[str, Any], a: dict[str, Any] | None) -> None:
    print(
        f"{f['app']} build {f['build']} on {f['channel']}, {_what(f, dry=a is None)}: "
        f"{format_count(f['adopters'], 'node')} x {_fetch_per_node(f)} "
        f"(of {format_bytes(f['size_bytes'])}), offload by adoption quarter "
        + " ".join(f"{100 * r:.0f}%" for r in f["offload"])
        + f" ({_basis(f)})"
    )
    chunks_only = "cdn_patches_total" not in f  # made before the CDN figures counted patches
    what = "CDN egress (chunks)" if chunks_only else "CDN egress"
    if a is None:
        print(
            f"{what} forecast: {format_bytes(f['cdn_total'])}, peak "
            f"{format_bytes(f['cdn_peak_per_min'])}/min at {utc_minute(f['cdn_peak_at'])}"
            + _patch_part(f)
        )
        _print_parts(f)
        return
    print(f"{'':28}{'predicted':>14}{'actual':>14}")
    print(
        f"{what + ' so far':<28}{format_bytes(a['cdn_predicted_so_far']):>14}"
        f"{format_bytes(a['cdn_actual_total']):>14}"
    )
    print(f"{what + ' in all':<28}{format_bytes(f['cdn_total']):>14}{'':>14}")
    if f.get("patches_total") or a.get("patches_actual_total"):  # a delta build
        if not chunks_only:
            print(
                f"{'  of which delta patches':<28}{format_bytes(f['cdn_patches_total']):>14}"
                f"{format_bytes(a.get('cdn_patches_actual_total', 0)):>14}"
            )
        print(
            f"{'delta patches, any source':<28}{format_bytes(f.get('patches_total', 0)):>14}"
            f"{format_bytes(a.get('patches_actual_total', 0)):>14}"
        )
    print(
        f"{'peak per minute':<28}{format_bytes(f['cdn_peak_per_min']):>14}"
        f"{format_bytes(a['cdn_actual_peak_per_min']):>14}"
    )
    _print_parts(f)
    predicted = {int(t): b for t, b in f["curve"]}
    actual = {int(t): b for t, b in a["actual"]}
    start = int(f["at"]) // 60 * 60
    minutes = sorted(m for m in {*predicted, *actual} if m <= start + a["elapsed_s"])
    for m in minutes[:60]:
        print(
            f"  minute {(m - start) // 60:>4} {utc_minute(m)[11:]:>8}  "
            f"{format_bytes(predicted.get(m, 0)):>12}{format_bytes(actual.get(m, 0)):>14}"
        )
    if len(minutes) > 60:
        print(f"  ... {len(minutes) - 60} more minutes (--json has them all)")


def _patch_part(f: dict[str, Any]) -> str:
    """A forecast's delta patches, in words (none: nothing)."""
    total = f.get("patches_total", 0)
    if not total:
        return ""
    if "cdn_patches_total" not in f:
        return f"; delta patches {format_bytes(total)} (from peers or the CDN)"
    return (
        f", of which delta patches {format_bytes(f['cdn_patches_total'])} "
        f"(of {format_bytes(total)} of patches, the rest from peers)"
    )


def _print_parts(f: dict[str, Any]) -> None:
    """The late joiners' part of the forecast and its split per mirror (forecasts made before
    the tracker modelled them have neither)."""
    if f.get("joiners"):
        print(
            f"late joiners: {format_count(f['joiners'], 'node')} "
            f"({f['join_rate_per_hour']:.1f}/h on the "
            f"channel), the whole build each: {format_bytes(f['joiners_cdn_total'])} of the "
            "CDN egress"
        )
    mirrors = f.get("mirrors", [])
    if len(mirrors) > 1 or (mirrors and mirrors[0]["url"] is not None):
        for m in mirrors:
            url = m["url"] or "(the nodes' own)"
            print(
                f"  mirror {url}: {format_bytes(m['cdn_total'])} "
                f"({100 * m['share']:.0f}%), peak {format_bytes(m['cdn_peak_per_min'])}/min "
                f"at {utc_minute(m['cdn_peak_at'])}"
            )
