"""``tracker fleet`` and ``tracker outcomes``: the fleet view and install outcomes, as tables.

    tracker fleet APP --url URL [--json]            which build the app's nodes run
    tracker fleet node NODE_ID --url URL [--json]   what one node runs and its recent outcomes
    tracker outcomes [APP] --url URL [--json]       success rate and failure codes per build

They read the open routes ``GET /v1/apps/{app}/fleet``, ``GET /v1/nodes/{node_id}`` and
``GET /v1/outcomes`` (docs/tracker-api.md), so an operator need not curl them. ``--json``
prints the tracker's answer as it came; the tables round and shorten for people. An app called
``node`` is still shown by ``tracker fleet node`` (one argument: an app; two: a node).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.errors import TrackerRefusedError, UsageError
from p2pnode.units import format_bytes

from .cli_load import utc_minute as _utc
from .fleet import FLEET_TTL

__all__ = ["add_parser", "print_fleet", "print_node", "print_outcomes", "run"]

_NODE_ID = re.compile(r"^[0-9a-fA-F]{40}$")
#: Hourly adoption points a build's row shows (``--json`` has them all).
ADOPTION_POINTS = 6


def add_parser(sub: Any) -> None:
    f = sub.add_parser(
        "fleet",
        help="which build each node of an app runs (APP), or what one node runs (node NODE_ID)",
    )
    f.add_argument("target", nargs="+", metavar="APP | node NODE_ID")
    o = sub.add_parser("outcomes", help="install outcomes per build: success rate, failure codes")
    o.add_argument("app", nargs="?", help="only this app's builds")
    for p in (f, o):
        p.add_argument("--url", required=True, help="tracker URL, e.g. http://127.0.0.1:7070")
        p.add_argument("--json", action="store_true")


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """("app", APP) or ("node", NODE_ID) from ``fleet``'s arguments."""
    words = args.target
    if len(words) == 1:
        return "app", words[0]
    if len(words) == 2 and words[0] == "node":
        if not _NODE_ID.match(words[1]):
            raise UsageError(
                f"{words[1]!r} is not a node id",
                fix="a node id is 40 hex digits (`p2pnode status --json` has it as node_id)",
            )
        return "node", words[1].lower()
    raise UsageError(
        f"cannot read `tracker fleet {' '.join(words)}`",
        fix="write `tracker fleet APP` or `tracker fleet node NODE_ID`",
    )


async def _get(client: TrackerClient, path: str, **params: str) -> dict[str, Any]:
    """The tracker's JSON answer (an unreachable tracker is told in ``tracker.cli.main``)."""
    resp = await client._request("GET", path, params=params or None)
    return dict(resp.json())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The answer ``fleet`` or ``outcomes`` prints (``--json``: as the tracker gave it)."""
    kind, name = ("outcomes", args.app) if args.command == "outcomes" else _target(args)
    async with TrackerClient(args.url) as client:
        try:
            if kind == "node":
                return await _get(client, f"/v1/nodes/{name}")
            if kind == "app":
                return await _get(client, f"/v1/apps/{name}/fleet")
            out = await _get(client, "/v1/outcomes", **({} if name is None else {"app": name}))
            if name is not None and not out.get("releases"):
                await _get(client, f"/v1/apps/{name}")  # 404 if it is not registered
            return out
        except TrackerRefusedError as exc:
            if exc.status != 404:
                raise
            raise _not_found(kind, name, args.url, exc) from exc


def _not_found(kind: str, name: str, url: str, exc: TrackerRefusedError) -> TrackerRefusedError:
    """A 404 in the operator's words: an unknown app, or a node the fleet view forgot."""
    if kind == "node":
        return TrackerRefusedError(
            f"the tracker at {url} has not seen node {name} lately",
            status=404,
            code=exc.code,
            fix="check the node id (`p2pnode status --json` has it as node_id); the fleet view "
            f"forgets a node {FLEET_TTL // 86400} days after its last announce or outcome",
        )
    return TrackerRefusedError(
        f"app {name} is not registered on the tracker at {url}",
        status=404,
        code=exc.code,
        fix="check the app's name (`tracker outcomes --url URL` lists the apps with outcomes) "
        "or register it with `tracker app add`",
    )


def _ago(t: float | None, now: float) -> str:
    """How long ago, in the largest unit that fits."""
    if t is None:
        return "-"
    s = max(0.0, now - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return "just now"


def _print(*renderables: Any) -> None:
    from rich.console import Console

    # wide enough for every column when piped (rich assumes 80 columns then)
    console = Console(highlight=False, width=None if _is_tty() else 160)
    for r in renderables:
        console.print(r)


def _is_tty() -> bool:
    import sys

    return sys.stdout.isatty()


def _table(*columns: str, right: tuple[str, ...] = ()) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    return table


def print_fleet(view: dict[str, Any], now: float | None = None) -> None:
    """One app's fleet: nodes per build with their share, last sighting and adoption."""
    now = time.time() if now is None else now
    days = view.get("ttl_s", 0) / 86400
    head = f"{view['app']}: {view['nodes']} node{'' if view['nodes'] == 1 else 's'}"
    if days:
        head += f" seen within {days:g} days"
    if view.get("updating"):
        head += f", {view['updating']} downloading a first build"
    if not view["builds"]:
        _print(head + "; no node runs a build of it yet")
        return
    table = _table(
        "build", "version", "nodes", "share", "last seen", "adoption (hourly)", right=("nodes",)
    )
    for b in view["builds"]:
        curve = [str(n) for _, n in b.get("adoption", [])[-ADOPTION_POINTS:]]
        table.add_row(
            str(b["build"]),
            b.get("version") or "?",
            str(b["nodes"]),
            f"{100 * b['share']:.0f}%",
            _ago(b.get("last_seen"), now),
            " > ".join(curve) or "-",
        )
    clients = view.get("clients") or {}
    versions = ", ".join(
        f"{v} x {n}" for v, n in sorted(clients.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    _print(head, table, f"client versions: {versions or '-'}")


def print_node(view: dict[str, Any], now: float | None = None) -> None:
    """One node: what it runs in each app, then its recent outcomes."""
    now = time.time() if now is None else now
    apps = _table("app", "build", "client", "last seen", "forgotten after", "last outcome")
    for s in view["apps"]:
        last = s.get("last_outcome")
        apps.add_row(
            s["app"],
            "downloading" if s.get("build") is None else str(s["build"]),
            s.get("client") or "unknown",
            _ago(s.get("last_seen"), now),
            _utc(s.get("expires")),
            "-" if not last else _outcome_words(last),
        )
    parts: list[Any] = [f"node {view['node_id']}", apps]
    recent = view.get("recent_outcomes") or []
    if recent:
        table = _table("when", "app", "kind", "from", "to", "outcome")
        for o in recent:
            table.add_row(
                _utc(o.get("at")),
                o["app"],
                o["kind"],
                "-" if o.get("from_build") is None else str(o["from_build"]),
                str(o["to_build"]),
                _outcome_words(o, kind=False),
            )
        parts += ["recent outcomes, newest first:", table]
    else:
        parts.append("no outcome reported lately")
    _print(*parts)


def _outcome_words(o: dict[str, Any], kind: bool = True) -> str:
    what = o.get("kind", "") if kind else ""
    if o.get("outcome") == "success":
        return f"{what} ok".strip()
    return f"{what} failed: {o.get('code') or 'no code'}".strip()


def print_outcomes(out: dict[str, Any]) -> None:
    """Per build: how many installs succeeded, why the others failed, rollbacks, bytes."""
    releases = out.get("releases") or []
    if not releases:
        _print("no outcome reported yet")
        return
    table = _table(
        "app",
        "build",
        "version",
        "reports",
        "success",
        "failures by code",
        "rollbacks",
        "mean ok",
        "bytes cdn / peers / reused",
        "last report",
        right=("reports", "rollbacks", "mean ok"),
    )
    for r in sorted(releases, key=lambda r: (r["app"], -r["build"])):
        rate = r.get("success_rate")
        success = "-" if rate is None else f"{100 * rate:.1f}% ({r['success']})"
        codes = r.get("failure_codes") or {}
        failed = ", ".join(f"{c} {n}" for c, n in sorted(codes.items(), key=lambda kv: -kv[1]))
        if r.get("failure", 0) and not failed:
            failed = f"{r['failure']} (no code)"
        mean = r.get("mean_success_s")
        b = r.get("bytes") or {}
        table.add_row(
            r["app"],
            str(r["build"]),
            r.get("version") or "?",
            str(r["reports"]),
            success,
            failed or "-",
            str(r.get("rollbacks", 0)),
            "-" if mean is None else f"{mean:.1f} s",
            " / ".join(format_bytes(b.get(s, 0)) for s in ("cdn", "peers", "reused")),
            _utc(r.get("last_report")),
        )
    _print(table)
