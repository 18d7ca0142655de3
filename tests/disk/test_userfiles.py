"""The user's own files in an install directory survive update, rollback and repair."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from p2pnode.disk.state import StateDir
from p2pnode.disk.userfiles import carry
from p2pnode.node.install import InstallOptions, install, rollback
from p2pnode.node.verify import verify
from p2pnode.release.publish import PublishResult, publish
from tests.support.release import KEY, TRUST, make_release, tree

# path -> (content, mode); every one gets its own old mtime. "settings.ini" is a path build 2
# ships; "data/sub/notes.txt" sits in a folder only build 1 has.
USER = {
    "saves/slot1.sav": (b"slot one" * 500, 0o600),
    "saves/auto/slot2.sav": (b"slot two", 0o640),
    "settings.ini": (b"[video]\nfullscreen=1\n", 0o644),
    "data/mods/mod.lua": (b"print('mod')\n", 0o755),
    "data/user.cfg": (b"name=player\n", 0o644),
    "data/sub/notes.txt": (b"my notes\n", 0o600),
}
LINK = "latest.sav"  # a link of the user's, to a save


def add_user_files(dest: Path) -> None:
    for i, (rel, (data, mode)) in enumerate(sorted(USER.items())):
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    (dest / LINK).symlink_to("saves/slot1.sav")
    (dest / "screenshots").mkdir()  # an empty folder of the user's


def user_view(dest: Path, where: dict[str, str] | None = None) -> dict[str, tuple[bytes, int, int]]:
    """Each user file's content, mode and mtime, read at ``where[path]`` (default: its path)."""
    where = where or {}
    out = {}
    for rel in USER:
        p = dest / where.get(rel, rel)
        st = p.lstat()
        out[rel] = (p.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def expected_user_view() -> dict[str, tuple[bytes, int, int]]:
    return {
        rel: (data, mode, 1_600_000_000_000_000_000 + i)
        for i, (rel, (data, mode)) in enumerate(sorted(USER.items()))
    }


def ours(dest: Path, result: PublishResult) -> dict[str, tuple[bytes, int]]:
    """The release's files as found in ``dest``."""
    found = tree(dest)
    return {f.path: found[f.path] for f in result.manifest.files if f.path in found}


def two_builds(tmp_path: Path) -> tuple[PublishResult, PublishResult, Path]:
    src = tmp_path / "src"
    cdn = tmp_path / "cdn"
    make_release(src, big=1 << 20)
    p1 = publish(src, app="game", version="1", build=1, key=KEY, out=cdn)
    (src / "settings.ini").write_text("[video]\nfullscreen=0\n")  # now the game ships one
    (src / "empty").unlink()  # dropped: it was ours, it goes
    (src / "data" / "sub" / "small.txt").unlink()  # and with it the folder data/sub
    (src / "data" / "sub").rmdir()
    (src / "bin" / "run").write_bytes(b"#!/bin/sh\necho two\n")
    p2 = publish(src, app="game", version="2", build=2, key=KEY, out=cdn)
    return p1, p2, cdn


def test_user_files_survive_update_rollback_and_repair(tmp_path: Path) -> None:
    p1, p2, cdn = two_builds(tmp_path)
    dest = tmp_path / "game"
    trio.run(install, str(cdn / p1.manifest_path), dest, TRUST, InstallOptions())
    v1 = tree(dest)
    add_user_files(dest)
    want = expected_user_view()

    r2 = trio.run(install, str(cdn / p2.manifest_path), dest, TRUST, InstallOptions())
    assert r2.action == "updated"
    assert len(p2.manifest.files) == len(ours(dest, p2))
    assert all(
        ours(dest, p2)[f.path][0] == (cdn / "game/2/files" / f.path).read_bytes()
        for f in p2.manifest.files
    )
    assert (dest / "settings.ini").read_text() == "[video]\nfullscreen=0\n"
    assert list(r2.displaced) == ["settings.ini"]
    aside = r2.displaced["settings.ini"]
    assert aside.startswith("settings.ini.user-")
    assert user_view(dest, {"settings.ini": aside}) == want  # content, mode and mtime
    assert os.readlink(dest / LINK) == "saves/slot1.sav"
    assert (dest / "screenshots").is_dir()
    assert r2.kept_user_files == len(USER) + 1  # the files and the link
    assert not (dest / "empty").exists()  # build 1 shipped it, build 2 does not: it was ours
    assert not StateDir(dest).old.exists()

    r3 = trio.run(rollback, dest, InstallOptions(mirrors=["/nonexistent/"]))
    assert r3.action == "rolled-back" and r3.bytes_cdn == 0
    assert ours(dest, p1) == v1
    assert not (dest / "settings.ini").exists()  # build 2's settings.ini was ours
    assert user_view(dest, {"settings.ini": aside}) == want
    assert r3.displaced == {}

    report = trio.run(lambda: verify(dest))
    assert report.ok and report.extra == []
    assert set(report.user_files) == set(USER) - {"settings.ini"} | {aside, LINK}

    # Repair: a damaged file of ours is rebuilt, a folder of the user's in place of one of
    # our files is displaced beside it, and nothing else of the user's moves.
    (dest / "data" / "big.pak").write_bytes(b"x" * (1 << 20))
    (dest / "data" / "dup.pak").unlink()
    (dest / "data" / "dup.pak").mkdir()
    (dest / "data" / "dup.pak" / "mine.txt").write_text("kept")
    report = trio.run(lambda: verify(dest, repair=True))
    assert report.ok and sorted(report.repaired) == ["data/big.pak", "data/dup.pak"]
    moved = report.displaced["data/dup.pak"]
    assert (dest / moved / "mine.txt").read_text() == "kept"
    assert ours(dest, p1) == v1
    assert user_view(dest, {"settings.ini": aside}) == want
    assert trio.run(lambda: verify(dest)).ok


def test_without_atomic_exchange_user_files_are_carried_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two-rename fallback (no renameat2) parks the old tree the same way."""
    import p2pnode.disk.switch as switch_module

    monkeypatch.setattr(switch_module, "exchange", lambda a, b: False)
    p1, p2, cdn = two_builds(tmp_path)
    dest = tmp_path / "game"
    trio.run(install, str(cdn / p1.manifest_path), dest, TRUST, InstallOptions())
    add_user_files(dest)
    r2 = trio.run(install, str(cdn / p2.manifest_path), dest, TRUST, InstallOptions())
    assert user_view(dest, r2.displaced) == expected_user_view()


ROOT = Path(__file__).resolve().parents[2]
# Each is a step of an update that carries user files: the exchange, every rename (the old
# tree parked, then each user entry), making them durable, the snapshot, the harvest and the
# old tree's deletion. Renames are walked until the update runs to its end.
STEPS = [
    "p2pnode.disk.switch.exchange:1",
    *(f"os.rename:{n}" for n in range(1, 12)),
    "p2pnode.disk.userfiles.fsync_dir:1",
    "p2pnode.disk.snapshot.record:1",
    "p2pnode.disk.switch.harvest:1",
    "shutil.rmtree:2",
]


def test_kill_9_at_every_step_of_a_switch_loses_no_user_file(tmp_path: Path) -> None:
    p1, p2, cdn = two_builds(tmp_path)
    want = expected_user_view()
    args = ["update", str(cdn / p2.manifest_path), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    finished = 0
    for i, step in enumerate(STEPS):
        dest = tmp_path / f"game{i}"
        trio.run(install, str(cdn / p1.manifest_path), dest, TRUST, InstallOptions())
        add_user_files(dest)
        killed = subprocess.run(
            [sys.executable, "-m", "tests.support.killat", *args, "--dest", str(dest)],
            env={**env, "P2PNODE_KILL_AT": step},
            capture_output=True,
            timeout=120,
        )
        if killed.returncode == 0:  # the step was never reached: the update ran to its end
            assert step.startswith("os.rename:"), (step, killed.stderr)
            finished += 1
            continue
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        # Nothing is lost in between: each user file is in the install, or in the old tree
        # (still named stage/ right after the exchange, then old/).
        sd = StateDir(dest)
        old = sd.old
        for rel in USER:
            parked = [dest / rel, old / rel, sd.stage / rel, *dest.glob(rel + ".user-*")]
            assert any(p.exists() for p in parked), (step, rel)
        done = subprocess.run(
            [sys.executable, "-m", "p2pnode", *args, "--dest", str(dest)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (step, done.stderr)
        assert ours(dest, p2) == {
            f.path: ((cdn / "game/2/files" / f.path).read_bytes(), f.mode)
            for f in p2.manifest.files
        }, step
        (aside,) = [p.name for p in dest.glob("settings.ini.user-*")]
        assert user_view(dest, {"settings.ini": aside}) == want, step
        assert os.readlink(dest / LINK) == "saves/slot1.sav", step
        assert (dest / "screenshots").is_dir() and not old.exists(), step
        assert trio.run(lambda d=dest: verify(d)).ok, step  # type: ignore[misc]
    # The renames were walked to the end: the old tree parked, then seven user entries
    # (saves/, settings.ini, latest.sav, screenshots/, data/mods/, data/user.cfg,
    # data/sub/notes.txt) each killed before and after.
    assert sum(s.startswith("os.rename:") for s in STEPS) - finished == 1 + 7


def fake_manifest(*paths: str, nokeep: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(files=[SimpleNamespace(path=p) for p in paths], nokeep=nokeep)


def test_carry_displaces_under_a_parent_the_new_build_ships_as_a_file(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for rel in ("data/a.pak", "data/mods/m.lua", "notes", "cfg/user.ini", "cfg/x"):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text(rel)
    (new / "cfg").mkdir(parents=True)
    (new / "data").write_text("now a file")  # build 2 ships a file where data/ was
    (new / "cfg" / "x").write_text("ours")  # and cfg/x, which the user had
    (new / "cfg" / "x.user-T").write_text("someone else's")  # a name already taken
    shipped = fake_manifest("data/a.pak")
    target = fake_manifest("data", "cfg/x")
    done = carry(old, new, shipped, target, "T")
    assert done.kept == 4
    assert done.displaced == {"data/mods": "data.user-T/mods", "cfg/x": "cfg/x.user-T.2"}
    assert (new / "data.user-T/mods/m.lua").read_text() == "data/mods/m.lua"
    assert (new / "notes").read_text() == "notes"
    assert (new / "cfg/user.ini").read_text() == "cfg/user.ini"
    assert (new / "cfg/x.user-T").read_text() == "someone else's"
    assert (new / "cfg/x").read_text() == "ours"
    # Left in the old tree: only what the old build shipped. A second run moves nothing.
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()) == [
        "data/a.pak"
    ]
    assert carry(old, new, shipped, target, "T").kept == 0


def nokeep_builds(tmp_path: Path, nokeep: tuple[str, ...]) -> tuple[Path, Path, Path]:
    src, cdn = tmp_path / "src", tmp_path / "cdn"
    make_release(src, big=1 << 16)
    p1 = publish(src, app="game", version="1", build=1, key=KEY, out=cdn)
    (src / "bin" / "run").write_bytes(b"#!/bin/sh\necho two\n")
    p2 = publish(src, app="game", version="2", build=2, key=KEY, out=cdn, nokeep=nokeep)
    dest = tmp_path / "game"
    trio.run(install, str(cdn / p1.manifest_path), dest, TRUST, InstallOptions())
    for rel in ("cache/x", "saves/slot1.sav"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(rel.encode())
    return cdn / p2.manifest_path, dest, StateDir(dest).quarantine


def test_an_update_does_not_keep_what_its_build_names_in_nokeep(tmp_path: Path) -> None:
    manifest, dest, quarantine = nokeep_builds(tmp_path, ("cache/*",))
    r = trio.run(install, str(manifest), dest, TRUST, InstallOptions())
    assert r.action == "updated" and r.not_kept == ["cache/x"]
    assert r.kept_user_files == 1
    assert (dest / "saves/slot1.sav").read_bytes() == b"saves/slot1.sav"
    assert not (dest / "cache/x").exists()
    (moved,) = quarantine.glob("not-kept-*/cache/x")  # moved aside, never deleted
    assert moved.read_bytes() == b"cache/x"
    report = trio.run(lambda: verify(dest))
    assert report.ok and report.extra == [] and report.user_files == ["saves/slot1.sav"]


def test_a_build_without_nokeep_keeps_everything(tmp_path: Path) -> None:
    manifest, dest, quarantine = nokeep_builds(tmp_path, ())
    r = trio.run(install, str(manifest), dest, TRUST, InstallOptions())
    assert r.action == "updated" and r.not_kept == [] and r.kept_user_files == 2
    assert (dest / "cache/x").read_bytes() == b"cache/x"
    assert (dest / "saves/slot1.sav").read_bytes() == b"saves/slot1.sav"
    assert not quarantine.exists() or not any(quarantine.iterdir())


def test_carry_quarantines_nokeep_entries_and_resumes_after_a_kill(tmp_path: Path) -> None:
    old, new, bin_ = tmp_path / "old", tmp_path / "new", tmp_path / "quarantine"
    for rel in ("cache/a", "cache/b", "cache/keep/c", "logs/today.log", "saves/s.sav"):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text(rel)
    new.mkdir()
    target = fake_manifest("bin/run", nokeep=("cache/[ab]", "logs"))
    real_rename = os.rename
    calls = 0

    def dying_rename(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("killed")
        real_rename(src, dst)

    os.rename = dying_rename  # type: ignore[assignment]
    try:
        with pytest.raises(OSError):
            carry(old, new, None, target, "T", bin_)
    finally:
        os.rename = real_rename
    done = carry(old, new, None, target, "T", bin_)  # what recovery does: run it again
    got = sorted(p.relative_to(bin_).as_posix() for p in bin_.rglob("*") if p.is_file())
    assert got == ["not-kept-T/cache/a", "not-kept-T/cache/b", "not-kept-T/logs/today.log"]
    assert (new / "cache/keep/c").read_text() == "cache/keep/c"
    assert (new / "saves/s.sav").read_text() == "saves/s.sav"
    assert not [p for p in old.rglob("*") if p.is_file()]
    assert carry(old, new, None, target, "T", bin_).not_kept == []
    assert len(done.not_kept) == 2  # the first run had moved one before it died
