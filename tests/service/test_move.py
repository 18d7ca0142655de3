"""Move jobs: an installed game, with the user's files, moved to another DEST by the daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.launchlock import launch_lock_path, launching
from p2pnode.disk.state import InstallState
from p2pnode.disk.state import StateDir as InstallDir
from p2pnode.errors import JobStateError, UsageError
from p2pnode.service.control import Service
from p2pnode.service.job import JobKind, JobState
from p2pnode.service.statedir import StateDir, read_json
from tests.support.daemon import TRUST, daemon, game, installed, job, until
from tests.support.release import tree

ROOT = Path(__file__).resolve().parents[2]
USER = {"saves/slot1.sav": b"level 7\n", "config.ini": b"[video]\nfps=144\n"}


def add_user_files(dest: Path) -> None:
    for rel, data in USER.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    (dest / "saves" / "latest").symlink_to("slot1.sav")


def expected(src: Path) -> dict[str, tuple[bytes, int]]:
    """The tree a moved game must have: the build's files and the user's."""
    want = tree(src)
    for rel, data in USER.items():
        want[rel] = (data, 0o644 & ~_umask())
    want["saves/latest"] = (USER["saves/slot1.sav"], 0o644 & ~_umask())
    return want


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def assert_moved(old: Path, new: Path, src: Path) -> None:
    assert tree(new) == expected(src)
    assert os.readlink(new / "saves" / "latest") == "slot1.sav"
    assert not old.exists() and not InstallDir(old).root.exists()
    assert InstallDir(new).load().current is not None


async def install_one(tmp_path: Path, cdn: LocalCDN, state: Path, old: Path) -> str:
    url, _ = game(tmp_path, cdn, "mover", 700_000)
    async with daemon(state) as running:
        entry, first = running.service.add(url, str(old), TRUST)
        await installed(running, first.id)
    add_user_files(old)
    return entry.id


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than tmp_path (a tmpfs), for the copy path."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) on this machine")
    where = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="p2pnode-move-"))
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("method", ["rename", "copy"])
def test_a_move_carries_the_game_and_the_users_files_and_the_launcher_lock_follows(
    tmp_path: Path, cdn: LocalCDN, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    if method == "copy":  # the copy path on one filesystem (a real second one: below)
        monkeypatch.setattr("p2pnode.service.worker.choose_method", lambda src, dst: "copy")
    old, new = tmp_path / "old", tmp_path / "games" / "new"
    state = tmp_path / "state"

    async def main() -> None:
        entry = await install_one(tmp_path, cdn, state, old)
        async with daemon(state) as running:
            svc = running.service
            moving = svc.move(entry, str(new))
            assert moving.kind is JobKind.MOVE and moving.target == str(new)
            await installed(running, moving.id)
            assert svc.library.get(entry).dest == str(new)
            assert job(running, moving.id).progress.bytes_total is not None
            # The game runs from its new place, and an update waits for its launcher there.
            assert launch_lock_path(new).exists()
            check = svc.submit(entry, JobKind.VERIFY)
            await installed(running, check.id)

    trio.run(main)
    assert_moved(old, new, tmp_path / "src-mover-1")
    assert not (state / "moves").exists() or not any((state / "moves").iterdir())


def test_a_move_waits_while_the_game_runs(tmp_path: Path, cdn: LocalCDN) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    state = tmp_path / "state"

    async def main() -> None:
        entry = await install_one(tmp_path, cdn, state, old)
        async with daemon(state) as running:
            with launching(old):
                j = running.service.move(entry, str(new))
                await until(lambda: job(running, j.id).state is JobState.DOWNLOADING)
                await trio.sleep(1.5)
                assert job(running, j.id).state is JobState.DOWNLOADING
                assert old.is_dir() and not new.exists()
            await installed(running, j.id, timeout=10)

    trio.run(main)
    assert_moved(old, new, tmp_path / "src-mover-1")


def fake_install(dest: Path) -> None:
    dest.mkdir(parents=True)
    sd = InstallDir(dest)
    sd.create()
    sd.save(InstallState(app="x", current="00" * 32))


def test_moves_that_cannot_be_done_are_refused_and_change_nothing(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.lock()
    svc = Service.open(state, {}, "config.toml")
    a, b = tmp_path / "a", tmp_path / "b"
    fake_install(a)
    fake_install(b)
    ea, _ = svc.add("http://cdn.test/a.p2pm", str(a), TRUST)
    svc.add("http://cdn.test/b.p2pm", str(b), TRUST)
    for j in list(svc.queue.jobs):
        svc.cancel(j.id)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("someone's")
    (tmp_path / "file").write_text("a file")
    refused = {
        str(tmp_path / "full"): "exists and is not empty",
        str(tmp_path / "file"): "exists and is not a directory",
        str(a / "sub"): "lies inside the install",
        str(a): "is the install",
        str(tmp_path): "overlaps the DEST",
        str(b / "x"): "overlaps the DEST of library entry",
        "relative/path": "not an absolute path",
    }
    before = state.library.read_bytes(), state.queue.read_bytes()
    for to, why in refused.items():
        with pytest.raises(UsageError, match=why):
            svc.move(ea.id, to)
    assert (state.library.read_bytes(), state.queue.read_bytes()) == before
    (tmp_path / "empty").mkdir()
    j = svc.move(ea.id, str(tmp_path / "empty"))  # an empty directory is a fine target
    with pytest.raises(JobStateError, match="already has job"):
        svc.move(ea.id, str(tmp_path / "c"))
    svc.cancel(j.id)
    assert svc.discard_dest(j.id) is None  # a move undoes itself; nothing to discard
    (tmp_path / "fresh").mkdir()
    c = tmp_path / "c"
    ec, _ = svc.add("http://cdn.test/c.p2pm", str(c), TRUST)
    with pytest.raises(JobStateError, match="already has job"):  # its install is unfinished
        svc.move(ec.id, str(tmp_path / "fresh"))
    state.unlock()


def test_a_move_without_room_at_the_target_fails_and_leaves_the_game(
    tmp_path: Path, cdn: LocalCDN, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("p2pnode.service.worker.choose_method", lambda src, dst: "copy")
    monkeypatch.setattr("p2pnode.service.move.MOVE_RESERVE", 1 << 60)
    old, new = tmp_path / "old", tmp_path / "new"
    state = tmp_path / "state"

    async def main() -> None:
        entry = await install_one(tmp_path, cdn, state, old)
        async with daemon(state) as running:
            j = running.service.move(entry, str(new))
            await until(lambda: job(running, j.id).state is JobState.FAILED)
            assert "MiB free" in (job(running, j.id).error or "")
            assert running.service.library.get(entry).dest == str(old)

    trio.run(main)
    assert tree(old) == expected(tmp_path / "src-mover-1") and not new.exists()


def test_cancelling_a_copy_undoes_it(
    tmp_path: Path, cdn: LocalCDN, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2pnode.service.move as move

    monkeypatch.setattr("p2pnode.service.worker.choose_method", lambda src, dst: "copy")
    monkeypatch.setattr(move, "BLOCK", 4096)
    slow = move._copy_file

    def crawl(*args: object, **kwargs: object) -> None:
        import time

        time.sleep(0.3)
        slow(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(move, "_copy_file", crawl)
    old, new = tmp_path / "old", tmp_path / "new"
    state = tmp_path / "state"

    async def main() -> None:
        entry = await install_one(tmp_path, cdn, state, old)
        async with daemon(state) as running:
            j = running.service.move(entry, str(new))
            await until(lambda: new.exists())
            running.service.cancel(j.id)
            await until(lambda: not new.exists() and not InstallDir(new).root.exists(), 10)
            await trio.sleep(0.5)
            assert job(running, j.id).state is JobState.CANCELLED
            assert running.service.library.get(entry).dest == str(old)

    trio.run(main)
    assert tree(old) == expected(tmp_path / "src-mover-1")
    assert not any((state / "moves").iterdir())


# kill -9 mid-move and a restart ------------------------------------------------------------

#: (where the target is, the step before which the daemon is killed)
KILLS = [
    ("same", "p2pnode.service.move.fsync_dir:2"),  # between the two renames
    ("other", "p2pnode.service.move._copy_file:3"),  # mid-copy: rolled back, copied again
    ("other", "p2pnode.service.move._same_bytes:2"),  # mid-verify
    ("other", "p2pnode.service.library.replace:1"),  # verified, library not yet switched
    ("other", "p2pnode.service.move.finish:1"),  # library switched, old tree not deleted
]


def run_daemon_process(state: Path, kill_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "P2PNODE_CONFIG": str(state / "none.toml")}
    if kill_at:
        env["P2PNODE_KILL_AT"] = kill_at
        cmd = [sys.executable, "-m", "tests.support.killat"]
    else:
        cmd = [sys.executable, "-m", "p2pnode"]
    args = ["daemon", "--state", str(state), "--json"]
    return subprocess.run(
        [*cmd, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def whole_somewhere(old: Path, new: Path, src: Path) -> None:
    """Every file of the game (the build's and the user's) is whole at one of the places."""
    at_old, at_new = tree(old) if old.exists() else {}, tree(new) if new.exists() else {}
    for rel, want in expected(src).items():
        assert at_old.get(rel) == want or at_new.get(rel) == want, rel


@pytest.mark.parametrize(("where", "step"), KILLS)
def test_kill_9_at_a_step_of_a_move_and_a_restart_leave_the_game_whole_at_one_place(
    tmp_path: Path, cdn: LocalCDN, other_fs: Path, where: str, step: str
) -> None:
    old = tmp_path / "old"
    new = (tmp_path if where == "same" else other_fs) / "new"
    state = tmp_path / "state"
    src = tmp_path / "src-mover-1"
    entry = trio.run(install_one, tmp_path, cdn, state, old)
    lock = StateDir(state)
    lock.lock()
    moving = Service.open(lock, {}, "config.toml").move(entry, str(new))
    lock.unlock()

    killed = run_daemon_process(state, step)
    assert killed.returncode == -9, killed.stderr  # the step was reached
    whole_somewhere(old, new, src)

    def restarted() -> str:
        async def main() -> str:
            async with daemon(state) as running:
                await installed(running, moving.id, timeout=30)
                return running.service.library.get(entry).dest

        return trio.run(main)

    assert restarted() == str(new)
    assert_moved(old, new, src)
    assert not any((state / "moves").iterdir())
    doc = read_json(state / "queue.json")
    assert doc is not None and {j["id"]: j["state"] for j in doc["jobs"]}[moving.id] == "installed"
