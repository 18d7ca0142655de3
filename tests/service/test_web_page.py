"""The web page in headless Chromium: log in with the token URL, see the library and the queue
live, and act (pause, resume, move to the top, add a game, change a setting, cancel, move
a game)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import trio

from p2pnode.disk.state import InstallState
from p2pnode.disk.state import StateDir as InstallDir
from p2pnode.service.api import serve_api
from p2pnode.service.control import Service
from p2pnode.service.job import JobKind, JobState, Progress
from p2pnode.service.statedir import StateDir
from tests.support.chromium import Chromium

KEY = "ed25519:" + "ab" * 32
TRACKER = "http://127.0.0.1:1"


def clicks(browser: Chromium, url: str, tmp_path: Path, screenshot: Path) -> None:
    """What a user does on the page (runs in a thread: the browser calls block)."""
    browser.goto(url)  # /?token=...: the cookie is set, then the page itself
    browser.wait_for("document.querySelectorAll('tr[data-job]').length === 2")
    assert browser.js("location.search") == ""  # the token left the address bar
    assert browser.js("document.getElementById('live').textContent") == "live"
    row = "document.querySelector('tr[data-job=j1]')"
    assert browser.js(f"{row}.dataset.state") == "downloading"
    assert "peers 300.0 KiB" in browser.js(f"{row}.textContent")
    assert "3 peers" in browser.js(f"{row}.textContent")
    browser.screenshot(screenshot)  # a job downloading: bar, rate, ETA, bytes by source
    browser.js(f"{row}.querySelector('button[data-act=pause]').click()")
    browser.wait_for(f"{row}.dataset.state === 'paused'")
    browser.js(f"{row}.querySelector('button[data-act=resume]').click()")
    browser.wait_for(f"{row}.dataset.state === 'queued'")
    browser.js("document.querySelector('tr[data-job=j2] button[data-act=top]').click()")
    browser.wait_for("document.querySelector('tbody#jobs tr').dataset.job === 'j2'")
    # add a game through the form
    fill = {
        "add-source": "third",
        "add-dest": str(tmp_path / "g3"),
        "add-trust": KEY,
        "add-tracker": TRACKER,
    }
    for field, value in fill.items():
        browser.js(f"document.getElementById('{field}').value = {value!r}")
    browser.js("document.querySelector('#add-form button').click()")
    browser.wait_for("document.querySelector('tr[data-entry=g3]') !== null")
    # a bad value: the daemon's error and fix are shown, nothing changes
    browser.js("document.getElementById('setting-key').value = 'max_active'")
    browser.js("document.getElementById('setting-value').value = '0'")
    browser.js("document.querySelector('#setting-form button').click()")
    browser.wait_for("document.getElementById('error').textContent.includes('fix:')")
    browser.js("document.getElementById('setting-value').value = '2'")
    browser.js("document.querySelector('#setting-form button').click()")
    browser.wait_for("document.querySelector('dd[data-setting=max_active]').textContent === '2'")
    assert browser.js("document.getElementById('error').textContent") == ""
    # move g1: cancel its install, let its DEST stand for an installed game, then the entry's
    # button picks it for the move form
    browser.js(f"{row}.querySelector('button[data-act=cancel]').click()")
    browser.wait_for(f"{row}.dataset.state === 'cancelled'")
    g1 = tmp_path / "g1"
    g1.mkdir()
    InstallDir(g1).create()
    InstallDir(g1).save(InstallState(app="game", current="00" * 32))
    browser.js("document.querySelector('tr[data-entry=g1] button[data-act=move]').click()")
    assert browser.js("document.getElementById('move-entry').value") == "g1"
    browser.js(f"document.getElementById('move-to').value = {str(tmp_path / 'moved')!r}")
    browser.js("document.querySelector('#move-form button').click()")
    browser.wait_for("document.querySelector('tr[data-job=j4]') !== null")
    assert "move" in browser.js("document.querySelector('tr[data-job=j4]').textContent")
    assert browser.js("document.getElementById('move-entry').value") == ""  # form reset


async def test_the_page_shows_and_acts(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.lock()
    svc = Service.open(state, {}, "config.toml", local_now=lambda: datetime(2026, 12, 2, 12))
    svc.set_setting(
        "alt_speed", [{"days": "weekdays", "begin": "18:00", "end": "23:00", "download": "2M"}]
    )
    svc.add("game", str(tmp_path / "g1"), [KEY], tracker=TRACKER)
    svc.add("other", str(tmp_path / "g2"), [KEY], tracker=TRACKER)
    (start,) = svc.next_actions().actions
    svc.report(
        "j1",
        start.attempt,
        phase=JobState.DOWNLOADING,
        progress=Progress(
            400 << 10, 1 << 20, 250e3, (("cdn", 100 << 10), ("peers", 300 << 10)), peers=3
        ),
    )
    screenshot = Path(os.environ.get("P2PNODE_PAGE_SCREENSHOT", str(tmp_path / "page.png")))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_api, svc, "127.0.0.1", 0, state.api_token())
        url = f"http://127.0.0.1:{port}/?token={state.api_token()}"
        browser = await trio.to_thread.run_sync(Chromium, tmp_path / "profile")
        try:
            await trio.to_thread.run_sync(clicks, browser, url, tmp_path, screenshot)
        finally:
            await trio.to_thread.run_sync(browser.close)
        nursery.cancel_scope.cancel()
    assert svc.queue.get("j1").state is JobState.CANCELLED
    move = svc.queue.get("j4")
    assert move.kind is JobKind.MOVE and move.target == str(tmp_path / "moved")
    assert [j["id"] for j in svc.jobs_view()][:1] == ["j2"]
    assert "g3" in svc.library and svc.queue.max_active == 2
    assert screenshot.stat().st_size > 10_000
