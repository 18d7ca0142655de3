"""The real thing over loopback: `tracker serve` and `tracker app add` as processes, the SSE
feed, graceful shutdown, and the dashboard rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pnode.demo.tracker import LocalTracker
from p2pnode.discovery.tracker import PeerQualityReport, TrackerClient
from p2pnode.errors import P2PNodeError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release.metadata import ReleaseInfo, UpdateType
from tests.support.chromium import HEADLESS, chromium_binary
from tests.support.tracker import ADMIN, APP

#: Release notes a hostile or careless publisher might write: markup, and more than a line.
NOTES = (
    "Fixes <script>alert('x')</script> & the crash on load " + "(really) " * 12 + "\nSecond line."
)


def tracker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracker", *args]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A `tracker serve` process on a free loopback port; yields its URL."""
    tracker = LocalTracker(tmp_path / "data", ADMIN)
    try:
        url = tracker.start()
    except P2PNodeError as exc:
        pytest.fail(str(exc))
    try:
        yield url
    finally:
        assert tracker.stop() == 0  # graceful shutdown on SIGTERM


def test_cli_app_add_and_errors(served: str) -> None:
    key = keys.format_public_key(keys.public_key_bytes(keys.generate_key()))
    out = subprocess.run(
        tracker_cmd(
            "app", "add", APP, "--key", key, "--url", served, "--admin-token", ADMIN, "--json"
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    reg = json.loads(out.stdout)
    assert reg["key"] == key and reg["publisher_token"].startswith("pub_")
    cases = [
        (["--key", key, "--admin-token", ADMIN], "already registered"),  # twice
        (["--key", "ed25519:zz", "--admin-token", ADMIN], "not a public key"),
        (["--key", key, "--admin-token", "x" * 20], "admin token is wrong"),
    ]
    for extra, words in cases:
        bad = subprocess.run(
            tracker_cmd("app", "add", APP, "--url", served, *extra),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode != 0 and bad.stdout == ""
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "(fix: " in lines[0], bad.stderr
    down = subprocess.run(
        tracker_cmd(
            "app", "add", "x", "--key", key, "--url", "http://127.0.0.1:9", "--admin-token", ADMIN
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1, down.stderr
    assert "cannot reach the tracker at http://127.0.0.1:9 (ConnectError" in down.stderr
    assert "(fix: start it (`tracker serve`) or fix --url)" in down.stderr  # this CLI's option


async def test_sse_feed_and_dashboard(
    served: str,
    tmp_path: Path,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    client = TrackerClient(served, token=ADMIN)
    await client.add_app(APP, keys.public_key_bytes(publisher))
    first = make_manifest(1)
    await client.publish(APP, "stable", first.encode())
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as http, trio.open_nursery() as nursery:

        async def listen() -> None:
            url = f"{served}/v1/apps/{APP}/channels/stable/events"
            async with http.stream("GET", url) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))

        nursery.start_soon(listen)
        with trio.fail_after(2):
            while not events:  # the current head arrives at once
                await trio.sleep(0.01)
        t0 = trio.current_time()
        second = make_manifest(2, info=ReleaseInfo(UpdateType.CRITICAL, NOTES))
        await client.publish(APP, "stable", second.encode())
        with trio.fail_after(1):
            while len(events) < 2:
                await trio.sleep(0.01)
        assert trio.current_time() - t0 < 1.0
        assert [e["build"] for e in events] == [1, 2]
        assert [e["update_type"] for e in events] == [None, "critical"]
        assert events[1]["notes"] == NOTES
        nursery.cancel_scope.cancel()

    # some swarm activity, then look at the dashboard in a real browser
    nodes = [keys.generate_key() for _ in range(5)]
    for i, k in enumerate(nodes[:3]):
        await client.announce(
            k,
            app=APP,
            manifest_id=second.id,
            port=7000 + i,
            event="completed",
            size=100,
            left=0,
            from_peers=75,
            from_cdn=25,
            numwant=0,
        )
    await client.announce(
        nodes[3], app=APP, manifest_id=second.id, port=7010, size=100, left=60, numwant=0
    )
    await client.report(
        nodes[4],
        [
            PeerQualityReport(keys.node_id_of(keys.public_key_bytes(k)), bytes=1 << 20, rate=10**6)
            for k in nodes[:3]
        ],
    )
    # one node's outcome says which of its bytes were delta patches, by source
    await client.report_outcome(
        nodes[0],
        {"app": APP, "manifest": second.id.hex(), "to_build": 2, "kind": "update",
         "outcome": "success", "bytes_peers": 75, "bytes_cdn": 25, "bytes_patches": 30,
         "bytes_patches_cdn": 20, "bytes_patches_peers": 10},
    )  # fmt: skip
    await client.aclose()
    dom = await trio.to_thread.run_sync(dump_dom, f"{served}/dashboard", tmp_path / "chrome")
    row = dom.split(f'data-manifest="{second.id.hex()}"', 1)[1].split("</tr>", 1)[0]
    cells = [c.split(">", 1)[1] for c in row.split("<td")[1:]]
    cells = [c.split("</td>", 1)[0] for c in cells]
    assert cells[:6] == [APP, "1.2", "2", "3", "1", "3"], cells
    assert cells[6:8] == ["225 B (patches 10 B)", "75 B (patches 20 B)"], cells
    assert cells[8] == "75.0%"
    # the build's type, and its notes escaped: the first line cut short, the rest one click away
    assert cells[9] == "critical"
    summary = cells[10].split("<summary>", 1)[1].split("</summary>", 1)[0]
    assert summary == html.escape(NOTES.split("\n", 1)[0][:80], quote=False) + "…"
    full = cells[10].split('<div class="notes-full">', 1)[1].split("</div>", 1)[0]
    assert full == html.escape(NOTES, quote=False) and "<script>" not in dom.split("<table", 1)[1]
    assert 'id="k-seeders">3<' in dom and 'id="k-offload">75.0%<' in dom
    assert 'id="k-leechers">1<' in dom
    assert 'data-refreshes="' in dom and "cannot load stats" not in dom
    # the charts drew what the stats hold: one release with 300 B from peers + CDN, three
    # scored peers (1 MiB at 1 MB/s each: score 0.7 * 2/3 + 0.3 * 0.5 = 0.62), 3 completions
    charts = dict(
        re.findall(r'<canvas id="chart-([a-z]+)"[^>]*data-(?:bars|points)="([^"]*)"', dom)
    )
    assert charts["offload"] == "[300]", charts
    # ... and says what it shows: a title, axes with their units, a legend of the series
    offload = dom.split('<canvas id="chart-offload"', 1)[1].split(">", 1)[0]
    assert 'data-x-label="Release (app and version)"' in offload
    assert 'data-y-label="Bytes received (B)"' in offload  # 300 B: ticks in bytes
    ticks = re.search(r'data-y-ticks="([^"]*)"', offload)
    assert ticks is not None and json.loads(html.unescape(ticks[1])) == ["0", "100", "200", "300"]
    assert "came from: peers vs the CDN, chunks vs delta\n    patches</figcaption>" in dom
    legend = dom.split('<ul id="chart-offload-legend"', 1)[1].split("</ul>", 1)[0]
    assert re.findall(r'class="swatch"[^>]*></span>([^<]+)</li>', legend) == [
        "From peers: chunks",
        "From peers: delta patches",
        "From the CDN: chunks",
        "From the CDN: delta patches",
    ]
    assert charts["quality"] == "[0,0,0,0,0,0,3,0,0,0]", charts
    legend = dom.split('<ul id="chart-quality-legend"', 1)[1].split("</ul>", 1)[0]
    assert "Peers scored by their reporters" in legend
    assert charts["adoption"] == "1", charts  # one minute bucket so far
    assert int(charts["load"]) >= 1
    # the line charts say what they show too: axes titled, UTC time ticks, a legend
    for chart, x, y, names in [
        ("adoption", "Time (UTC, per minute with completions)", "Completed installs (total)",
         [f"{APP} 1.2 (build 2)"]),
        ("load", "Time (UTC)", "Requests per second", ["Requests/s, both ports (every 2 s)"]),
    ]:  # fmt: skip
        tag = dom.split(f'<canvas id="chart-{chart}"', 1)[1].split(">", 1)[0]
        assert f'data-x-label="{x}"' in tag and f'data-y-label="{y}"' in tag, tag
        xticks = re.search(r'data-x-ticks="([^"]*)"', tag)
        assert xticks is not None and json.loads(html.unescape(xticks[1])), tag
        assert all(
            re.fullmatch(r"\d\d:\d\d(:\d\d)?", t) for t in json.loads(html.unescape(xticks[1]))
        )
        legend = dom.split(f'<ul id="chart-{chart}-legend"', 1)[1].split("</ul>", 1)[0]
        assert re.findall(r'class="swatch"[^>]*></span>([^<]+)</li>', legend) == names


async def test_dashboard_shows_rollouts_halts_and_outcomes_per_build(
    served: str,
    tmp_path: Path,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    client = TrackerClient(served, token=ADMIN)
    await client.add_app(APP, keys.public_key_bytes(publisher))
    first, second = make_manifest(1), make_manifest(2)
    await client.publish(APP, "stable", first.encode())
    await client.publish(APP, "stable", second.encode(), rollout=25)
    for i in range(20):  # 2 of 20 failed: past the default 5% of at least 20
        failed = i < 2
        fields: dict[str, Any] = {
            "app": APP,
            "manifest": second.id.hex(),
            "to_build": 2,
            "from_build": 1,
            "kind": "update",
            "outcome": "failure" if failed else "success",
        }
        if failed:
            fields["code"] = "integrity_check_failed"
        await client.report_outcome(keys.generate_key(), fields)
    back = {"app": APP, "manifest": first.id.hex(), "to_build": 1, "from_build": 2}
    await client.report_outcome(
        keys.generate_key(), {**back, "kind": "rollback", "outcome": "success"}
    )
    await client.aclose()
    dom = await trio.to_thread.run_sync(dump_dom, f"{served}/dashboard", tmp_path / "chrome")

    def cells(marker: str) -> list[str]:
        row = dom.split(marker, 1)[1].split("</tr>", 1)[0]
        return [
            html.unescape(re.sub(r"<[^>]*>", "", c.split(">", 1)[1])) for c in row.split("<td")[1:]
        ]

    got = cells(f'data-rollout="{APP}/stable"')
    assert got[:7] == [f"{APP} / stable", "halted", "2", "25%", "18 / 2", "10.0%",
                       "5.0% of \u2265 20"], got  # fmt: skip
    assert got[7].startswith("auto: 2 of 20 nodes failed")
    banner = dom.split('id="rollout-banner"', 1)[1].split("</div>", 1)[0]
    assert "hidden" not in banner.split(">", 1)[0]
    assert f"Rollout of {APP} build 2 on stable halted at 25%" in banner
    two = cells(f'data-outcome="{second.id.hex()}"')
    assert two == [APP, "1.2", "2", "20", "90.0%", "integrity_check_failed \u00d7 2", "1", "0"], two
    one = cells(f'data-outcome="{first.id.hex()}"')
    assert one[4:] == ["100.0%", "\u2013", "0", "1"], one  # rolled back from 2 to 1


def dump_dom(url: str, profile: Path) -> str:
    cmd = [
        chromium_binary(),
        *HEADLESS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
    ]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    return out.stdout


def test_cli_rotate_token_rollout_and_audit(served: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(tracker_cmd(*args), capture_output=True, text=True, timeout=30)

    key = keys.format_public_key(keys.public_key_bytes(keys.generate_key()))
    auth = ("--url", served, "--admin-token", ADMIN)
    first = json.loads(run("app", "add", APP, "--key", key, *auth, "--json").stdout)
    rotated = run("app", "rotate-token", APP, *auth, "--json")
    assert rotated.returncode == 0, rotated.stderr
    token = json.loads(rotated.stdout)["publisher_token"]
    assert token.startswith("pub_") and token != first["publisher_token"]
    none = run("rollout", APP, "stable", "show", "--url", served)
    assert none.returncode != 0 and "no rollout" in none.stderr
    lower = run("rollout", APP, "stable", "raise", "--url", served, "--token", token)
    assert lower.returncode != 0 and "percentage" in lower.stderr
    wrong = run("audit", "--url", served, "--admin-token", "x" * 20)
    assert wrong.returncode != 0 and "admin token is wrong" in wrong.stderr
    page = json.loads(run("audit", *auth, "--json").stdout)
    actions = [e["action"] for e in page["entries"]]
    assert actions == ["auth-refused", "token-rotated", "app-registered"], actions
    assert token not in json.dumps(page) and first["publisher_token"] not in json.dumps(page)
    text = run("audit", *auth, "--limit", "2")
    lines = text.stdout.splitlines()
    assert "token-rotated" in lines[1] and "admin (admin) from 127.0.0.1" in lines[1]
    assert lines[-1].startswith("older: --before ")
