"""docs/alerts.yml: valid rules (promtool), that fire on the series they are meant for, over
metric names the tracker exports, with tracker/alerts.py's thresholds; and the banner's own
evaluation of the same conditions."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import APP
from tracker import alerts as A

RULES = Path(__file__).resolve().parents[2] / "docs" / "alerts.yml"

#: promtool unit tests: each alert fires on the series it is about, and only then.
UNIT = Path(__file__).with_name("alerts_test.yml")


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (fix: bash scripts/setup.sh)")
    return binary


def rules() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def test_promtool_checks_the_rules_and_they_fire_on_their_series(tmp_path: Path) -> None:
    binary = promtool()
    out = subprocess.run(
        [binary, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(UNIT.read_text().replace("RULES_PATH", str(RULES)))
    out = subprocess.run(
        [binary, "test", "rules", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_use_the_banners_thresholds() -> None:
    r = rules()
    assert set(r) == {
        "BuildFailureRateHigh",
        "CdnOffloadFalling",
        "RolloutHalted",
        "FlaggedPeersRising",
        "TrackerLatencyHigh",
    }
    assert f"> {A.FAILURE_RATE}" in r["BuildFailureRateHigh"]
    assert f">= {A.FAILURE_MIN_REPORTS}" in r["BuildFailureRateHigh"]
    assert f"- {A.OFFLOAD_DROP}" in r["CdnOffloadFalling"]
    assert f"[{A.RECENT_S // 60}m]" in r["CdnOffloadFalling"]
    assert f"offset {A.HOUR_S // 3600}h" in r["CdnOffloadFalling"]
    assert f">= {A.FLAGGED_RISE}" in r["FlaggedPeersRising"]
    assert f"> {A.P99_MS / 1000}" in r["TrackerLatencyHigh"]


async def test_the_rules_name_metrics_the_tracker_exports(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await client.publish(APP, "stable", make_manifest(0).encode())
    await client.publish(APP, "stable", m.encode(), rollout=10)  # a staged rollout's gauges
    await client.change_rollout(APP, "stable", "halt")
    k = keys.generate_key()
    await client.announce(
        k, app=APP, manifest_id=m.id, port=7000, size=100, left=0, from_peers=60, from_cdn=40
    )
    outcome = {"app": APP, "manifest": m.id.hex(), "to_build": 1, "kind": "install"}
    await client.report_outcome(k, {**outcome, "outcome": "success"})
    text = (await client._http.get("/metrics")).text
    exported = set(re.findall(r"^(tracker_\w+?)(?:\{| )", text, re.M))
    named = set(re.findall(r"\btracker_\w+", " ".join(rules().values())))
    assert named <= exported, named - exported
    # ... and the tracker's own evaluation sees the halt too, for the dashboard's banner
    alerts = (await client._http.get("/v1/stats")).json()["alerts"]
    assert [(a["name"], a["severity"]) for a in alerts] == [("RolloutHalted", "critical")]
    assert alerts[0]["summary"] == (f"the rollout of {APP} build 1 on stable is halted: operator")


def stats(peers: int, cdn: int, flagged: int = 0, **kw: Any) -> dict[str, Any]:
    return {
        "releases": [{"bytes_from_peers": peers, "bytes_from_cdn": cdn}],
        "quality": {"flagged": ["x"] * flagged},
        "load": {"p99_ms": kw.get("p99", 1.0)},
        "rollouts": kw.get("rollouts", []),
    }


def names(alerts: list[A.Alert]) -> list[str]:
    return [a.name for a in alerts]


def test_the_banner_evaluates_the_same_conditions() -> None:
    w = A.AlertWatch()
    t = 1_800_000_000.0
    peers = cdn = 0
    for minute in range(0, 61):  # an hour at 90% offload
        peers, cdn = peers + 900, cdn + 100
        assert w.evaluate(stats(peers, cdn), [], t + 60 * minute) == []
    t += 3600
    for minute in range(1, 16):  # then 15 minutes at 10%
        peers, cdn = peers + 100, cdn + 900
        got = w.evaluate(stats(peers, cdn), [], t + 60 * minute)
    assert names(got) == ["CdnOffloadFalling"]
    assert "10%" in got[0].summary and "90%" in got[0].summary
    now = t + 16 * 60
    build = {"app": "game", "build": 2, "reports": 40, "failure": 3}
    got = w.evaluate(stats(peers, cdn), [build], now)
    assert names(got) == ["BuildFailureRateHigh", "CdnOffloadFalling"]
    assert w.evaluate(stats(peers, cdn), [{**build, "failure": 2}], now)[0].name != (
        "BuildFailureRateHigh"  # 5% is not more than 5%
    )
    small = {**build, "reports": 19, "failure": 19}
    assert "BuildFailureRateHigh" not in names(w.evaluate(stats(peers, cdn), [small], now))
    halted = {"app": "game", "channel": "stable", "build": 2, "state": "halted", "reason": "x"}
    live = {**halted, "state": "active"}
    got = w.evaluate(stats(peers, cdn, flagged=3, p99=300, rollouts=[halted, live]), [], now)
    assert names(got) == [
        "CdnOffloadFalling",
        "RolloutHalted",
        "FlaggedPeersRising",
        "TrackerLatencyHigh",
    ]
    assert [a.to_json()["severity"] for a in got] == ["warning", "critical", "warning", "warning"]
