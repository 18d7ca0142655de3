"""The dashboard's install-outcomes-over-time charts, rendered by headless Chromium from a
real `tracker serve` process: titled axes with units, a legend, what they drew."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP
from tests.tracker.test_fleet_dashboard import attr
from tests.tracker.test_server import dump_dom, served

__all__ = ["served"]  # the fixture, used here


async def test_outcomes_per_build_over_time_are_charted(
    served: str,
    tmp_path: Path,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    client = TrackerClient(served, token=ADMIN)
    await client.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    for m in (one, two):
        await client.publish(APP, "stable", m.encode())
    update = {"app": APP, "manifest": two.id.hex(), "to_build": 2, "from_build": 1,
              "kind": "update"}  # fmt: skip
    for i in range(10):  # 2 of 10 fail, with two codes
        code = "download_failed" if i == 0 else "insufficient_storage"
        failed = {"outcome": "failure", "code": code}
        await client.report_outcome(
            keys.generate_key(), {**update, **(failed if i < 2 else {"outcome": "success"})}
        )
    back = {"app": APP, "manifest": one.id.hex(), "to_build": 1, "from_build": 2}
    await client.report_outcome(keys.generate_key(), {**back, "kind": "rollback",
                                                      "outcome": "success"})  # fmt: skip
    await client.aclose()
    dom = await trio.to_thread.run_sync(dump_dom, f"{served}/dashboard", tmp_path / "chrome")
    assert 'data-refreshes="' in dom.split('id="outcome-charts"', 1)[1].split(">", 1)[0]

    rate = dom.split('<canvas id="chart-outcome-rate"', 1)[1].split(">", 1)[0]
    assert attr(rate, "data-x-label") == "Hour (UTC)"
    assert attr(rate, "data-y-label") == "Success rate (% of the hour's attempts)"
    # newest report first: the rollback landed on 1 (its success counts there) and fled 2
    assert json.loads(attr(rate, "data-builds")) == [2, 1]
    assert attr(rate, "data-lines") == "2"
    assert json.loads(attr(rate, "data-y-ticks"))[-1] == "100"
    legend = dom.split('id="chart-outcome-rate-legend"', 1)[1].split("</ul>", 1)[0]
    names = [re.sub(r"<[^>]*>", "", li) for li in legend.split("<li")[1:]]
    assert [n.split(">", 1)[1] for n in names] == [
        f"{APP} 1.2 (build 2)",
        f"{APP} 1.1 (build 1)",
    ], names

    codes = dom.split('<canvas id="chart-outcome-codes"', 1)[1].split(">", 1)[0]
    assert attr(codes, "data-x-label") == "Hour (UTC)"
    assert attr(codes, "data-y-label") == "Reports per hour"
    assert sum(json.loads(attr(codes, "data-bars"))) == 3  # 2 failures, 1 rollback from 2
    legend = dom.split('id="chart-outcome-codes-legend"', 1)[1].split("</ul>", 1)[0]
    assert re.findall(r"</span>([^<]*)</li>", legend) == [
        "Failed: download_failed",
        "Failed: insufficient_storage",
        "Rolled back from the build",
    ]

    # no node announced yet: the fleet and load charts still draw their axes (not blank boxes)
    for chart, y in (
        ("chart-fleet", "Nodes running the build"),
        ("chart-forecast", "CDN egress per minute"),
        ("chart-hours", "Announces"),
    ):
        canvas = dom.split(f'<canvas id="{chart}"', 1)[1].split(">", 1)[0]
        assert attr(canvas, "data-y-label") == y, chart
