"""The README's main command keeps working: the demo runs end to end and reports its numbers."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_and_reports_where_bytes_came_from() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "p2pnode", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    steps = {s["step"]: s for s in out["steps"]}
    assert steps["origin seed: install build 1"]["bytes_cdn"] > 40 << 20
    for k in (1, 2, 3):  # the leechers found the seed through the tracker: no CDN bytes
        leecher = steps[f"node-{k}: install build 1"]
        assert leecher["bytes_peers"] > 40 << 20 and leecher["bytes_cdn"] == 0
    assert out["offload_ratio"] > 0.5
    assert out["completed"] == {"1": 4, "2": 4}  # every follower's install, counted once
    update = steps["update to build 2"]
    assert update["bytes_cdn"] + update["bytes_peers"] < 4 << 20 < update["bytes_reused"]  # delta
    for name in ("origin-seed", "node-2", "node-3"):  # every follower updated, by delta too
        step = steps[f"{name}: build 2"]
        assert 0 < step["bytes_cdn"] + step["bytes_peers"] < 4 << 20 < step["bytes_reused"]
    assert steps["verify"]["note"] == "OK"
    assert 0 < steps["repair a flipped byte"]["bytes_cdn"] <= 8 << 20
    assert steps["rollback to build 1"]["bytes_cdn"] == 0  # offline
    # the tracker's CDN forecast for build 2 (made at its publish) beside what followed
    forecast = steps["forecast for build 2 vs what followed"]
    assert forecast["note"].startswith("CDN egress predicted ") and " x " in forecast["note"]
    assert "delta patches predicted " in forecast["note"], forecast["note"]
    assert "of it patches), actual " in forecast["note"]  # the CDN's whole egress, both sides
    f, actual = out["forecast"]["forecast"], out["forecast"]["actual"]
    assert f["adopters"] == 4 and f["patches_total"] > 0  # build 2's changed region: a patch
    assert actual["patches_actual_total"] > 0
    assert forecast["bytes_cdn"] == actual["cdn_actual_total"]
    assert out["dashboard"].endswith("/dashboard")
    # what the operator sees besides bytes: every install, update, the repair and the rollback
    # as outcomes per build, the fleet view (node-1 back on build 1), the audit log
    ops = out["operations"]
    kinds = {r["build"]: r["by_kind"] for r in ops["outcomes"]}
    ok = {"success": 1, "failure": 0}
    assert kinds[1] == {"install": {"success": 4, "failure": 0}, "rollback": ok}, kinds
    assert kinds[2] == {"update": {"success": 4, "failure": 0}, "repair": ok}, kinds
    assert {b["build"]: b["nodes"] for b in ops["fleet"]["builds"]} == {1: 1, 2: 3}
    actions = [e["action"] for e in ops["audit"]]
    assert actions.count("publish") >= 2 and "app-registered" in actions
    assert all(e["address"] == "127.0.0.1" for e in ops["audit"])
    assert out["update_notice_ms"] < 1000
    # The clients as daemons, driven by the command line's client verbs.
    d = out["daemons"]
    assert d["queue"] == {"demo-puzzle": "downloading", "demo-racer": "queued"}  # max_active 1
    assert d["paused"] == {"demo-puzzle": "paused", "demo-racer": "downloading"}
    assert d["resumed"] == "queued"
    assert d["critical_overtook"]
    # every job installed: the critical build 2 before the job queued ahead of it
    assert d["installed"]["A"].index("demo-arcade", 1) < d["installed"]["A"].index("demo-puzzle")
    assert sorted(d["installed"]["A"]) == sorted(
        ["demo-arcade"] * 2 + ["demo-puzzle", "demo-racer"]
    )
    assert "demo-arcade" in d["installed"]["B"]
    assert d["peer_bytes"] > 0  # daemon B got the game from daemon A's port
    assert steps["daemon B: demo-arcade"]["bytes_peers"] == d["peer_bytes"]
    assert d["web"].startswith("http://127.0.0.1:") and "/?token=" in d["web"]
