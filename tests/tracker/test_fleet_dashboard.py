"""The dashboard's fleet section and alerts banner, rendered by headless Chromium from a real
`tracker serve` process."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from p2pnode import __version__
from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP
from tests.tracker.test_server import dump_dom, served

__all__ = ["served"]  # the fixture, used here


def attr(tag: str, name: str) -> str:
    m = re.search(rf'{name}="([^"]*)"', tag)
    assert m is not None, (name, tag)
    return html.unescape(m[1])


async def test_the_fleet_section_and_the_alerts_banner(
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
    nodes = [keys.generate_key() for _ in range(20)]
    for i, k in enumerate(nodes):
        m = two if i < 12 else one
        for _ in range(2):  # the second announce carries the client version
            await client.announce(k, app=APP, manifest_id=m.id, port=0, size=100, left=0, numwant=0)
    await client.announce(
        keys.generate_key(), app=APP, manifest_id=two.id, port=0, size=100, left=50, numwant=0
    )
    # 2 of 20 updates to build 2 fail: 10% > 5% of at least 20, the banner's condition
    for i, k in enumerate(nodes):
        outcome = {"app": APP, "manifest": two.id.hex(), "to_build": 2, "from_build": 1}
        failed = {"outcome": "failure", "code": "insufficient_storage"}
        await client.report_outcome(
            k, {**outcome, "kind": "update", **(failed if i >= 18 else {"outcome": "success"})}
        )
    await client.aclose()
    dom = await trio.to_thread.run_sync(dump_dom, f"{served}/dashboard", tmp_path / "chrome")
    assert 'data-refreshes="' in dom.split('id="fleet"', 1)[1].split(">", 1)[0]
    banner = dom.split('<ul id="alerts"', 1)[1].split("</ul>", 1)[0]
    assert "hidden" not in banner.split(">", 1)[0]
    assert re.findall(r'data-alert="(\w+)"', banner) == ["BuildFailureRateHigh"]
    assert "2 of 20 installs of game build 2 failed (10% &gt; 5%)" in banner
    rows = dom.split('<table id="fleet-builds"', 1)[1].split("</table>", 1)[0]
    cells = [
        re.findall(r"<td>([^<]*)</td>", r)
        for r in rows.split("<tbody>", 1)[1].split("</tr>")
        if "<td>" in r
    ]
    # build 2: the 12 that announced it, plus the 6 whose successful update said so
    assert [c[:4] for c in cells] == [
        ["2", two.id.hex()[:12] + "…", "18", "85.7%"],
        ["1", one.id.hex()[:12] + "…", "2", "9.5%"],
    ]
    clients = dom.split('id="fleet-clients"', 1)[1].split(">", 1)[1].split("<", 1)[0]
    assert clients == f"{__version__} \N{MULTIPLICATION SIGN} 21"
    assert "21 nodes seen in the last 72 h, 1 downloading their first build" in dom
    canvas = dom.split('<canvas id="chart-fleet"', 1)[1].split(">", 1)[0]
    assert attr(canvas, "data-lines") == "2"
    assert attr(canvas, "data-x-label") == "Time (UTC, one sample per 1 h)"
    assert attr(canvas, "data-y-label") == "Nodes running the build"
    assert json.loads(attr(canvas, "data-y-ticks"))[-1] in ("20", "18")
    assert attr(canvas, "aria-label").startswith("Adoption: nodes running each build over time")
    legend = dom.split('<ul id="chart-fleet-legend"', 1)[1].split("</ul>", 1)[0]
    assert re.findall(r'class="swatch"[^>]*></span>([^<]+)</li>', legend) == [
        "1.2 (build 2)",
        "1.1 (build 1)",
    ]
