"""``p2pnode daemon`` as a process: kill -9 mid-download and a restart, SIGTERM, one per state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.stage import Journal
from p2pnode.disk.state import StateDir
from p2pnode.service.control import Service
from p2pnode.service.statedir import StateDir as ServiceState
from p2pnode.service.statedir import read_json
from tests.support.daemon import TRUST, game, sent
from tests.support.release import tree


def start_daemon(state: Path, config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "P2PNODE_CONFIG": str(config)}
    return subprocess.Popen(
        [sys.executable, "-m", "p2pnode", "daemon", "--state", str(state), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def states(state: Path) -> dict[str, str]:
    doc = read_json(state / "queue.json") or {"jobs": []}
    return {j["id"]: j["state"] for j in doc["jobs"]}


def test_kill_9_mid_download_and_a_restart_finish_every_job_within_1_1x(
    tmp_path: Path, cdn: LocalCDN
) -> None:
    games = [game(tmp_path, cdn, f"k{n}", 4_000_000) for n in range(2)]
    config = tmp_path / "config.toml"
    config.write_text("[service]\nmax_active = 1\nmax_download_rate = '2M'\n")
    state = tmp_path / "state"
    lock = ServiceState(state)
    lock.lock()  # add the games as the API would, then hand the state dir to the daemon
    svc = Service.open(lock, {}, str(config))
    for n, (url, _) in enumerate(games):
        svc.add(url, str(tmp_path / f"dest{n}"), TRUST)
    lock.unlock()

    first = start_daemon(state, config)
    journal = StateDir(tmp_path / "dest0").journal
    try:
        wait_for(lambda: len(Journal.read_done(journal)) > 15, 30)  # ~1 MB of 64 KiB chunks
    finally:
        first.kill()  # SIGKILL
        first.communicate()
    assert states(state) == {"j1": "downloading", "j2": "queued"}

    second = start_daemon(state, config)
    try:
        wait_for(lambda: states(state) == {"j1": "installed", "j2": "installed"}, 60)
        third = start_daemon(state, config)  # the state dir is taken
        _, err = third.communicate(timeout=30)
        assert third.returncode != 0
        assert "another p2pnode daemon is using the state dir" in err and "--state" in err
    finally:
        second.send_signal(signal.SIGTERM)
        out, err = second.communicate(timeout=30)
    assert second.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"ok": True, "stopped": True}

    for n in range(len(games)):
        assert tree(tmp_path / f"dest{n}") == tree(tmp_path / f"src-k{n}-1")
    unique = sum(sum(pub.manifest.unique_chunks().values()) for _, pub in games)
    fetched = sent(cdn, "k0") + sent(cdn, "k1")
    print(f"fetched {fetched} of {unique} unique bytes: {fetched / unique:.3f}x")
    assert fetched <= 1.1 * unique, (fetched, unique)
