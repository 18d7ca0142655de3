"""How the node's results read: as JSON (``--json``, the watch event stream, the demo's
table) and as a person's summary on the terminal.

The person's summary is made from the JSON form, not from the result, so the two cannot say
different things.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..units import format_bytes, format_count

if TYPE_CHECKING:
    from pathlib import Path

    from ..disk.scan import VerifyReport
    from ..disk.snapshot import Health
    from ..release.publish import PublishResult
    from ..swarm.node import PeerStats
    from .result import InstallResult

__all__ = [
    "install_json",
    "peer_json",
    "print_install",
    "print_published",
    "print_status",
    "print_verify",
    "print_watch_event",
    "tracker_lines",
]


def install_json(result: InstallResult) -> dict[str, Any]:
    """One install's figures; the keys are a contract (scripts and the tracker's dashboards
    read them)."""
    m = result.manifest
    return {
        "action": result.action,
        "app": m.app,
        "version": m.version,
        "build": m.build,
        "manifest_id": m.id.hex(),
        "update_type": m.info.update_type,  # the signed word: null for an ordinary update
        "previous_build": result.previous_build,
        "files": len(m.files),
        "bytes_total": result.bytes_total,
        "bytes_cdn": result.bytes_cdn,
        "bytes_reused": result.bytes_reused,
        "bytes_resumed": result.bytes_resumed,
        "bytes_peers": result.bytes_peers,
        "bytes_patches": result.bytes_patches,  # patch bytes fetched: from peers and the CDN
        "bytes_patches_peers": result.bytes_patches_peers,
        "bytes_patches_cdn": result.bytes_patches_cdn,
        "bytes_patched": result.bytes_patched,  # chunk bytes the patches made
        "patches": {"applied": result.patches_applied, "failed": result.patches_failed},
        "methods": result.methods,
        "listen_port": result.listen_port,
        "discovery": result.discovery,
        "seconds": round(result.seconds, 3),
        "kept_user_files": result.kept_user_files,
        "displaced": result.displaced,
        "not_kept": result.not_kept,
        "repaired": result.repaired,
        "mirrors": result.mirrors,
        "peers": {addr: peer_json(st) for addr, st in result.peers.items()},
    }


def peer_json(st: PeerStats) -> dict[str, Any]:
    """How one peer did in an install, rounded for reading."""
    return {
        "node_id": st.node_id.hex(),
        "bytes": st.bytes,
        "chunks": st.chunks,
        "rate": round(st.rate),
        "latency_ms": round(st.latency_ms, 1),
        "connect_ms": round(1000 * st.connect_s, 1),
        "first_piece_ms": None if st.first_piece_s is None else round(1000 * st.first_piece_s, 1),
        "corrupt": st.corrupt,
        "failures": st.failures,
        "error": st.error,
    }


def print_install(out: dict[str, Any]) -> None:
    """One install's summary for a person, from its JSON form (``install_json``)."""
    name = f"{out['app']} {out['version']} (build {out['build']})"
    if out.get("update_type"):
        name += f", a {out['update_type']} update"
    if out["action"] == "unchanged":
        print(f"{name} is already installed")
        return
    print(
        f"{out['action']} {name}: {format_bytes(out['bytes_total'])} "
        f"in {out['seconds']:.1f}s; {format_bytes(out['bytes_peers'])} from peers, "
        f"{format_bytes(out['bytes_cdn'])} from the CDN, "
        f"{format_bytes(out['bytes_reused'])} reused locally, "
        f"{format_bytes(out['bytes_resumed'])} resumed"
    )
    if out.get("kept_user_files"):
        print(f"  kept {out['kept_user_files']} files of your own in place")
    for path, to in out.get("displaced", {}).items():
        print(f"  moved your {path} to {to}: the new build ships a file there")
    for path in out.get("not_kept", []):
        print(f"  moved your {path} to the install's quarantine: this build does not keep it")
    for addr, st in out["peers"].items():
        note = f" ({st['error']})" if st["error"] else ""
        print(
            f"  peer {addr}: {format_bytes(st['bytes'])} in {st['chunks']} chunks, "
            f"{st['corrupt']} corrupt{note}"
        )


def print_watch_event(event: dict[str, Any]) -> None:
    """One of ``watch``'s events for a person: progress on stdout, trouble on stderr."""
    if event["event"] == "installed":
        print_install(event)
        if event.get("listen_port"):
            print(f"serving on port {event['listen_port']} until the next build", flush=True)
    elif event["event"] == "watching":
        print(f"following {event['app']} on {event['channel']}", flush=True)
    elif event["event"] == "release":
        kind = f" ({event['update_type']} update)" if event.get("update_type") else ""
        out = f"{event['app']} build {event['build']} ({event['version']}) is out{kind}"
        print(out, flush=True)
    else:
        retry = event.get("retry_in_s")
        tail = f"; trying again in {retry:.0f}s" if retry else ""
        fix = f" (fix: {event['fix']})" if event.get("fix") else ""
        print(f"p2pnode: {event['event']}: {event['error']}{fix}{tail}", file=sys.stderr)


def print_published(out: dict[str, Any], result: PublishResult, cdn_dir: Path) -> None:
    """A publish's summary, from its JSON form (``PublishResult.as_json``)."""
    m = result.manifest
    print(
        f"published {m.app} {m.version} (build {m.build}, channel {m.channel}): "
        f"{len(m.files)} files, {format_bytes(m.total_size)}, "
        f"{out['chunks']} chunks -> {cdn_dir / result.manifest_path}"
    )
    print(f"manifest id {out['manifest_id']}")
    if m.nokeep:
        # Worth saying every time: nodes older than the field refuse this manifest.
        print(
            f"never kept across updates to this build: {', '.join(m.nokeep)} "
            "(nodes older than the nokeep field refuse this manifest)"
        )
    info = m.info
    if not info.empty:
        said = [f"type {info.update_type}" if info.update_type else ""]
        said.append(f"for {', '.join(info.platforms)}" if info.platforms else "")
        said.append(f"needs p2pnode >= {info.min_client}" if info.min_client else "")
        said.append(f"{len(info.notes.encode())} bytes of notes" if info.notes else "")
        # Also worth saying: only nodes that read manifest format 2 install this build.
        print(f"release info: {'; '.join(w for w in said if w)} (manifest format {m.format})")
    for line in tracker_lines(out.get("tracker") or {}):
        print(line)


def tracker_lines(answer: dict[str, Any]) -> list[str]:
    """What ``publish --tracker`` says of the tracker's answer (docs/tracker-api.md): the
    channel's move, a staged rollout and how to steer it, the CDN forecast."""
    if not answer:
        return []
    app, channel, build = answer["app"], answer["channel"], answer["build"]
    lines = [f"tracker: {app}/{channel} moved to build {build} (seq {answer['seq']})"]
    r = answer.get("rollout")
    if r:
        lines.append(
            f"staged rollout: build {build} is offered to {r['percent']:g}% of {channel}'s "
            f"nodes, the others keep the build before; it halts itself when "
            f"{100 * r['threshold']:g}% of at least {r['min_outcomes']} outcomes fail "
            f"(tracker rollout {app} {channel} show|raise PERCENT|halt|resume|complete --url ...)"
        )
    forecast = answer.get("forecast")
    if forecast:  # the tracker's word on what this publish costs the CDN (docs/operations.md)
        lines.append(
            f"forecast: {format_count(forecast['adopters'], 'node')} on {forecast['channel']} x "
            f"{format_bytes(forecast['need_bytes'] + forecast.get('patch_need_bytes', 0))} "
            "each -> CDN egress "
            f"{format_bytes(forecast['cdn_total'])}, peak "
            f"{format_bytes(forecast['cdn_peak_per_min'])}/min "
            f"(see: tracker forecast show {app} {build} --url ...)"
        )
    return lines


def print_verify(report: VerifyReport) -> None:
    """What ``verify`` found (and repaired or moved), a line per file, then the verdict."""
    for p in report.missing:
        print(f"missing  {p}")
    for p, why in report.corrupt.items():
        print(f"corrupt  {p}: {why}")
    for p in report.extra:
        print(f"extra    {p}")
    for p in report.repaired:
        print(f"repaired {p}")
    for p in report.quarantined:
        print(f"moved    {p} (extra file, kept in the install's quarantine)")
    for p, to in report.displaced.items():
        print(f"moved    {p} -> {to} (yours, in the way of a repaired file)")
    if report.user_files:
        print(f"{len(report.user_files)} files of your own (not the release's) left alone")
    m = report.manifest
    state = "OK" if report.ok else "DAMAGED"
    print(f"{m.app} {m.version} (build {m.build}): {state}")


def print_status(out: dict[str, Any], dest: str, health: Health | None) -> None:
    """What is installed in ``dest`` (and whether the tree still is that build) and what is
    kept for rollback, from ``status``'s JSON form."""
    cur = out["current"]
    if cur:
        print(f"{out['app']} {cur['version']} (build {cur['build']}) in {dest}")
    if health and not health.ok:
        n = len(health.missing) + len(health.damaged)
        what = "the install directory is gone" if health.gone else f"{n} files are not right"
        print(f"  {what}; `p2pnode install` (or `verify --repair`) restores it")
    for v in out["kept"]:
        how = "offline" if v["offline"] else "needs the network"
        print(f"  kept for rollback: {v['version']} (build {v['build']}), {how}")
