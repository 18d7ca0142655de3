"""What the demo's operator sees on the tracker besides bytes (issue 18): install outcomes per
build, the fleet view and the audit log, read back at the end and printed as a few lines under
the table, so that a new user sees them without opening the dashboard.

The first node's repair and rollback are reported here as ``p2pnode verify --repair --tracker``
and ``p2pnode rollback --tracker`` report them (the watchers report their installs themselves),
so the outcome tally shows every kind of attempt.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from ..node.options import InstallOptions
from ..node.result import InstallResult
from ..node.verbreport import report_attempt

__all__ = ["operations", "report", "summary_lines"]


async def report(tracker_url: str, identity_dir: Path, result: InstallResult) -> None:
    """Send ``result`` (a repair or a rollback) as the node at ``identity_dir``'s outcome."""
    await report_attempt(tracker_url, InstallOptions(identity_dir=identity_dir), result)


async def operations(tracker_url: str, admin: str, app: str) -> dict[str, Any]:
    """The tracker's outcomes and fleet view of ``app``, and its whole audit log."""
    async with httpx.AsyncClient(base_url=tracker_url) as http:
        outcomes = (await http.get("/v1/outcomes", params={"app": app})).json()["releases"]
        fleet = (await http.get(f"/v1/apps/{app}/fleet")).json()
        bearer = {"Authorization": f"Bearer {admin}"}
        audit = (await http.get("/v1/audit", params={"limit": 500}, headers=bearer)).json()
    return {"outcomes": outcomes, "fleet": fleet, "audit": audit["entries"]}


def summary_lines(ops: dict[str, Any], app: str) -> list[str]:
    """``operations`` as a new user reads it: one line each, naming where it comes from."""
    per_build = []
    for r in sorted(ops["outcomes"], key=lambda r: r["build"]):
        kinds = ", ".join(
            f"{kind} {n['success']} ok" + (f" {n['failure']} failed" if n["failure"] else "")
            for kind, n in sorted(r["by_kind"].items())
        )
        codes = ", ".join(f"{c} x {n}" for c, n in sorted(r["failure_codes"].items()))
        failures = f" (failures: {codes})" if codes else ""
        per_build.append(f"build {r['build']}: {kinds}{failures}")
    fleet = ops["fleet"]
    builds = ", ".join(f"build {b['build']} on {b['nodes']}" for b in fleet["builds"])
    actions = Counter(e["action"] for e in ops["audit"])
    who = sorted({f"{e['actor']} from {e['address'] or '-'}" for e in ops["audit"]})
    return [
        f"install outcomes of {app} the nodes reported (GET /v1/outcomes): "
        + ("; ".join(per_build) or "none"),
        f"fleet view of {app} (GET /v1/apps/{app}/fleet): {fleet['nodes']} nodes; "
        + (builds or "no build known")
        + " (node-1 rolled back)",
        f"audit log (GET /v1/audit, admin): {len(ops['audit'])} entries: "
        + ", ".join(f"{a} x {n}" for a, n in actions.most_common())
        + f"; by {', '.join(who)}",
        "staged rollouts: none here (p2pnode publish --rollout PERCENT, then tracker rollout "
        "APP CHANNEL raise|halt|resume|complete: docs/operations.md)",
    ]
