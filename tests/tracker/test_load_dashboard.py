"""The dashboard's load section in headless Chromium: a publish's forecast drawn beside what
followed (title, axes with units, legend), the release hour and its histogram; a screenshot is
kept (``P2PNODE_LOAD_SCREENSHOT`` names where) and its chart checked pixel by pixel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.release import keys
from tests.support.chromium import Chromium
from tests.support.tracker import ADMIN, APP, start
from tests.tracker.test_load import CHUNK, FROM_CDN, NODES, adopt, build, clocked_tracker
from tracker import Tracker

#: the chart's lines as drawn (tracker/static/load.js's LOAD_COLORS), in RGB
PREDICTED, ACTUAL = (0x4A, 0x7B, 0xD0), (0xE7, 0x6F, 0x51)


def look(url: str, profile: Path, shot: Path) -> dict[str, Any]:
    browser = Chromium(profile)
    try:
        browser.goto(f"{url}/dashboard")
        browser.wait_for(
            "document.getElementById('chart-forecast').dataset.build === '2'"
            " && document.getElementById('load-hour').dataset.hour !== undefined"
        )
        browser.js("document.getElementById('load').scrollIntoView()")
        browser.screenshot(shot)
        want, was = json.dumps(PREDICTED), json.dumps(ACTUAL)
        got: dict[str, Any] = browser.js(
            f"""(() => {{
              const c = document.getElementById('chart-forecast');
              const h = document.getElementById('chart-hours');
              const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              const count = rgb => {{ let n = 0; for (let i = 0; i < px.length; i += 4)
                if (px[i] === rgb[0] && px[i + 1] === rgb[1] && px[i + 2] === rgb[2]) n++;
                return n; }};
              const legend = [...document.querySelectorAll('#chart-forecast-legend li')]
                .map(li => li.textContent);
              const rows = [...document.querySelectorAll('#load-forecasts tbody tr')]
                .map(tr => [...tr.children].map(td => td.textContent));
              return {{caption: c.closest('figure').querySelector('figcaption').textContent,
                      x: c.dataset.xLabel, y: c.dataset.yLabel, lines: c.dataset.lines,
                      points: c.dataset.points, legend, rows,
                      predicted: count({want}), actual: count({was}),
                      hour: document.getElementById('load-hour').textContent,
                      hours_x: h.dataset.xLabel, hours_y: h.dataset.yLabel,
                      hours_bars: JSON.parse(h.dataset.bars)}};
            }})()"""
        )
        return got
    finally:
        browser.close()


async def test_the_load_section_shows_the_forecast_beside_what_followed(
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    clock, t, client = await clocked_tracker("sqlite", make_tracker, publisher, monkeypatch)
    nodes = [keys.generate_key() for _ in range(NODES)]
    t0 = clock.now
    one = build(publisher, 1, [1, 2, 3, 4], clock.now)
    await client.publish(APP, "stable", one.encode())
    await adopt(t, client, clock, nodes, one, 4 * CHUNK, 0)
    clock.now = t0 + 1800
    two = build(publisher, 2, [1, 2, 5, 6], clock.now)
    await client.publish(APP, "stable", two.encode())
    # build 2 finds fewer peers at first than build 1 did: 8 nodes fetch from the CDN, not 6
    await adopt(t, client, clock, nodes, two, 2 * CHUNK, 2 * CHUNK, FROM_CDN + 2)
    shot = Path(os.environ.get("P2PNODE_LOAD_SCREENSHOT", str(tmp_path / "load.png")))
    three = build(publisher, 3, [1, 2, 5, 7], clock.now)
    (tmp_path / "manifest.p2pm").write_bytes(three.encode())
    async with trio.open_nursery() as nursery:
        served = await start(nursery, t)
        got = await trio.to_thread.run_sync(look, served.base_url, tmp_path / "chrome", shot)
        url = served.base_url
        show = await trio.to_thread.run_sync(cli, "show", APP, "2", "--url", url)
        dry = await trio.to_thread.run_sync(
            cli, "dry-run", APP, "stable", str(tmp_path / "manifest.p2pm"), "--url", url,
            "--token", ADMIN, "--rollout", "50",
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    await client._http.aclose()

    assert (
        got["caption"]
        == "CDN egress per minute of build 2 on stable: predicted at publish vs actual"
    )
    assert got["x"] == "Time (UTC, per minute)"
    assert got["y"] == "CDN egress per minute (KB)"  # 4,000 B at the peak
    assert got["legend"] == ["Predicted at publish (total 12.0 KB)", "Actual (so far 16.0 KB)"]
    assert got["lines"] == "2"
    # both lines are on the canvas: pixels of each colour (where they agree, the actual one,
    # drawn last, covers the predicted)
    assert got["actual"] > 100 and got["predicted"] > 100, got
    assert [r[0] for r in got["rows"]] == ["build 2", "build 1"]
    two_row = got["rows"][0]
    assert two_row[2] == "publish"
    assert two_row[4:] == [
        "20", "2.0 KB", "12.0 KB", "12.0 KB", "16.0 KB", "4.0 KB / 4.0 KB", "1.33", "0 B / 0 B"
    ], two_row  # fmt: skip
    assert got["hour"].startswith("Recommended release hour: ")
    assert got["hours_x"] == "Hour of day (UTC)" and got["hours_y"] == "Announces"
    assert sum(got["hours_bars"]) == 2 * NODES
    assert shot.stat().st_size > 10_000
    # the same, printed by the CLI: the forecast beside what followed, minute by minute
    lines = show.splitlines()
    assert lines[0].startswith(f"{APP} build 2 on stable, published ")
    assert "20 nodes x 1.95 KiB each" in lines[0] or "20 nodes x 2.0 KiB each" in lines[0], lines[0]
    assert lines[2].split() == ["CDN", "egress", "so", "far", "11.7", "KiB", "15.6", "KiB"]
    # no delta patches, predicted or reported: no patch rows
    assert lines[4].split() == ["peak", "per", "minute", "3.9", "KiB", "3.9", "KiB"]
    minutes = [ln.split() for ln in lines[5:]]
    assert [m[1] for m in minutes] == [str(i) for i in range(NODES // 2)]
    assert [m[3:] for m in minutes[:4]] == [["3.9", "KiB", "3.9", "KiB"]] * 3 + [
        ["0", "B", "3.9", "KiB"]
    ]
    # a dry run of build 3 at 50%: half the fleet, one new chunk each, offload as build 2's
    assert "10 nodes x 1000 B each" in dry and "CDN egress forecast: " in dry, dry
    # a dry run's build was not published; the basis says what it rests on
    assert f"{APP} build 3 on stable, if published now (" in dry, dry
    assert "(shape and offload as measured for build" in dry and "(default)" not in dry


def cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tracker", "forecast", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout
