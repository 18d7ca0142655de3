"""The service facade: every change checked, saved, announced; a reload sees what clients saw."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from p2pnode.errors import JobStateError, UsageError
from p2pnode.service.control import PROGRESS_SAVE_INTERVAL, Service
from p2pnode.service.job import JobKind, JobState, Priority, Progress
from p2pnode.service.queue import Discard, Start, Stop
from p2pnode.service.statedir import StateDir, read_json

KEY = "ed25519:" + "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def opened(root: Path, clock: Clock, table: dict | None = None) -> Service:
    state = StateDir(root)
    state.lock()
    return Service.open(
        state,
        table or {},
        "config.toml",
        clock=clock,
        local_now=lambda: datetime(2026, 12, 2, 12, 0),  # a Wednesday noon
    )


def test_add_queues_an_install_and_saves_and_announces(tmp_path: Path) -> None:
    clock = Clock()
    svc = opened(tmp_path / "state", clock)
    seen: list[int] = []
    svc.on_change(lambda: seen.append(svc.version))
    entry, job = svc.add("game", str(tmp_path / "g"), [KEY], tracker="http://127.0.0.1:1")
    assert (entry.id, job.id, job.kind) == ("g1", "j1", JobKind.INSTALL)
    assert seen == [1]
    saved = read_json(tmp_path / "state" / "queue.json")
    assert saved is not None and saved["jobs"][0]["id"] == "j1"
    view = svc.snapshot()
    assert view["jobs"][0]["app"] == "game" and view["jobs"][0]["state"] == "queued"
    assert view["entries"][0]["dest"] == str(tmp_path / "g")


def test_refused_add_changes_nothing(tmp_path: Path) -> None:
    svc = opened(tmp_path / "state", Clock())
    svc.add("game", str(tmp_path / "g"), [KEY], tracker="http://127.0.0.1:1")
    v = svc.version
    with pytest.raises(UsageError):
        svc.add("other", str(tmp_path / "g" / "inside"), [KEY], tracker="http://127.0.0.1:1")
    assert svc.version == v and len(svc.library) == 1 and len(svc.queue.jobs) == 1


def test_pause_resume_cancel_and_stale_reports(tmp_path: Path) -> None:
    clock = Clock()
    svc = opened(tmp_path / "state", clock)
    svc.add("game", str(tmp_path / "g"), [KEY], tracker="http://127.0.0.1:1")
    assert svc.next_actions().actions == (Start("j1", 1),)
    assert svc.report("j1", 1, progress=Progress(10, 100, 5.0))
    svc.pause("j1")
    assert svc.next_actions().actions == (Stop("j1", 1),)
    assert not svc.report("j1", 1, progress=Progress(20, 100, 5.0))  # the stopped worker
    svc.resume("j1")
    assert svc.next_actions().actions == (Start("j1", 2),)
    svc.cancel("j1")
    assert svc.next_actions().actions == (Stop("j1", 2), Discard("j1"))
    with pytest.raises(JobStateError):
        svc.pause("j1")
    assert svc.remove("g1").id == "g1"


def test_remove_refused_while_a_job_is_unfinished(tmp_path: Path) -> None:
    svc = opened(tmp_path / "state", Clock())
    svc.add("game", str(tmp_path / "g"), [KEY], tracker="http://127.0.0.1:1")
    with pytest.raises(JobStateError, match="cancel"):
        svc.remove("g1")


def test_priority_and_top_order_the_line(tmp_path: Path) -> None:
    svc = opened(tmp_path / "state", Clock())
    for n in range(3):
        svc.add(f"game{n}", str(tmp_path / f"g{n}"), [KEY], tracker="http://127.0.0.1:1")
    svc.set_priority("j3", "top")
    svc.set_priority("j1", Priority.LOW)
    assert [j["id"] for j in svc.jobs_view()] == ["j3", "j2", "j1"]
    with pytest.raises(UsageError):
        svc.set_priority("j2", "urgent")


def test_settings_change_max_active_and_persist(tmp_path: Path) -> None:
    clock = Clock()
    svc = opened(tmp_path / "state", clock, {"max_active": 1})
    view = svc.set_setting("max_active", 3)
    assert view["max_active"] == 3 and svc.queue.max_active == 3
    svc.set_setting("max_download_rate", "2M")
    assert svc.caps().download == 2 * 1024 * 1024
    with pytest.raises(UsageError):
        svc.set_setting("max_active", 0)
    assert svc.queue.max_active == 3
    again = opened(tmp_path / "state2", clock)
    assert again.queue.max_active == 1
    svc.state.unlock()
    svc2 = opened(tmp_path / "state", clock, {"max_active": 1})
    assert svc2.queue.max_active == 3 and svc2.caps().download == 2 * 1024 * 1024
    svc2.reset_setting("max_active")
    assert svc2.queue.max_active == 1


def test_progress_saved_at_most_every_interval_and_on_flush(tmp_path: Path) -> None:
    clock = Clock()
    root = tmp_path / "state"
    svc = opened(root, clock)
    svc.add("game", str(tmp_path / "g"), [KEY], tracker="http://127.0.0.1:1")
    svc.next_actions()
    clock.t += 1
    svc.report("j1", 1, progress=Progress(10, 100, 5.0))

    def saved_done() -> int:
        doc = read_json(root / "queue.json")
        assert doc is not None
        return int(doc["jobs"][0]["progress"]["bytes_done"])

    assert saved_done() == 0  # too soon after the last save
    clock.t += PROGRESS_SAVE_INTERVAL
    svc.report("j1", 1, progress=Progress(50, 100, 5.0))
    assert saved_done() == 50
    svc.report("j1", 1, progress=Progress(60, 100, 5.0))
    assert saved_done() == 50
    svc.flush()
    assert saved_done() == 60


def test_reload_puts_a_running_job_back_in_line(tmp_path: Path) -> None:
    clock = Clock()
    root = tmp_path / "state"
    svc = opened(root, clock)
    svc.add("game", str(tmp_path / "g"), [KEY], tracker="http://127.0.0.1:1")
    svc.next_actions()
    svc.report("j1", 1, phase=JobState.DOWNLOADING, progress=Progress(10, 100, 1.0))
    svc.flush()
    svc.state.unlock()
    again = opened(root, clock)
    job = again.queue.get("j1")
    assert job.state is JobState.QUEUED and job.progress.bytes_done == 10
    assert again.next_actions().actions == (Start("j1", 2),)
