"""An install directory named through a symbolic link (a games folder on another disk) is
installed into the link's target, which the link keeps pointing at; links that cannot be
installed through are refused before anything is fetched."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import trio

import p2pnode.disk.linkeddest as linkeddest
from p2pnode.disk.state import StateDir
from p2pnode.errors import InstallError
from p2pnode.node.install import InstallOptions, install, rollback
from p2pnode.node.verify import verify
from tests.disk.test_userfiles import (
    add_user_files,
    expected_user_view,
    ours,
    two_builds,
    user_view,
)
from tests.support.e2e import cli
from tests.support.release import TRUST, tree


def linked(tmp_path: Path) -> tuple[Path, Path]:
    """``lib/game`` -> ``disk2/game`` (an empty folder): the link and its target."""
    target = tmp_path / "disk2" / "game"
    target.mkdir(parents=True)
    (tmp_path / "lib").mkdir()
    link = tmp_path / "lib" / "game"
    link.symlink_to("../disk2/game")  # relative, as `ln -s` is often used
    return link, target


def still_linked(link: Path) -> None:
    assert link.is_symlink() and os.readlink(link) == "../disk2/game"
    assert sorted(os.listdir(link.parent)) == ["game"]  # no state beside the link


def test_linked_dest_installs_into_the_target_through_update_rollback_repair(
    tmp_path: Path,
) -> None:
    p1, p2, cdn = two_builds(tmp_path)
    link, target = linked(tmp_path)
    r1 = trio.run(install, str(cdn / p1.manifest_path), link, TRUST, InstallOptions())
    assert r1.action == "installed"
    still_linked(link)
    v1 = tree(target)
    assert ours(target, p1) == v1
    assert (target.parent / ".game.p2pnode" / "state.json").exists()
    add_user_files(link)  # through the link, as the game would

    r2 = trio.run(install, str(cdn / p2.manifest_path), link, TRUST, InstallOptions())
    assert r2.action == "updated"
    still_linked(link)
    assert len(ours(target, p2)) == len(p2.manifest.files)
    assert user_view(target, r2.displaced) == expected_user_view()
    assert not StateDir(link).old.exists()

    r3 = trio.run(rollback, link, InstallOptions(mirrors=["/nonexistent/"]))
    assert r3.action == "rolled-back" and r3.bytes_cdn == 0
    still_linked(link)
    assert ours(target, p1) == v1
    assert user_view(target, r2.displaced) == expected_user_view()

    (target / "data" / "big.pak").write_bytes(b"x" * 10)
    assert cli("status", "--dest", str(link))["install"] == "damaged"
    report = trio.run(lambda: verify(link, repair=True))
    assert report.ok and report.repaired == ["data/big.pak"]
    assert ours(target, p1) == v1
    assert user_view(target, r2.displaced) == expected_user_view()
    status = cli("status", "--dest", str(link))
    assert status["install"] == "ok" and status["current"]["build"] == 1
    assert [k["build"] for k in status["kept"]] == [2]
    still_linked(link)


def test_link_to_a_link_is_followed_to_the_directory(tmp_path: Path) -> None:
    p1, _p2, cdn = two_builds(tmp_path)
    _link, target = linked(tmp_path)
    outer = tmp_path / "desktop-game"
    outer.symlink_to(tmp_path / "lib" / "game")
    trio.run(install, str(cdn / p1.manifest_path), outer, TRUST, InstallOptions())
    assert outer.is_symlink() and ours(target, p1) == tree(target)
    assert StateDir(outer).root == target.parent / ".game.p2pnode"


def dangling(tmp_path: Path) -> tuple[Path, str]:
    link = tmp_path / "game"
    link.symlink_to(tmp_path / "unmounted" / "game")
    return link, "which does not exist"


def to_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "notes.txt").write_text("x")
    link = tmp_path / "game"
    link.symlink_to("notes.txt")
    return link, "which is not a directory"


def loop(tmp_path: Path) -> tuple[Path, str]:
    link = tmp_path / "game"
    link.symlink_to("other")
    (tmp_path / "other").symlink_to("game")
    return link, "loops back on itself"


@pytest.mark.parametrize("make", [dangling, to_a_file, loop])
def test_unusable_links_are_refused_before_anything_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object
) -> None:
    import p2pnode.node.install as install_module

    p1, _p2, cdn = two_builds(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    link, why = make(work)  # type: ignore[operator]
    before = sorted(os.listdir(work))

    async def no_fetch(location: str) -> bytes:
        raise AssertionError("fetched before refusing")

    monkeypatch.setattr(install_module, "read_manifest", no_fetch)
    with pytest.raises(InstallError, match=why) as info:
        trio.run(install, str(cdn / p1.manifest_path), link, TRUST, InstallOptions())
    assert info.value.fix and "link" in info.value.fix
    assert sorted(os.listdir(work)) == before  # nothing created, the link untouched
    monkeypatch.undo()
    out = cli("install", str(cdn / p1.manifest_path), "--dest", str(link), ok=False)
    assert why in out["_stderr"]


def legacy_install(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An install made at ``lib/game`` whose folder the user then moved to ``disk2/game`` and
    replaced by a link, leaving the state beside the link (as versions before linked
    destinations were resolved kept it)."""
    p1, p2, cdn = two_builds(tmp_path)
    real = tmp_path / "lib" / "game"
    trio.run(install, str(cdn / p1.manifest_path), real, TRUST, InstallOptions())
    add_user_files(real)
    (tmp_path / "disk2").mkdir()
    shutil.move(real, tmp_path / "disk2" / "game")
    real.symlink_to("../disk2/game")
    return real, tmp_path / "disk2" / "game", cdn / p2.manifest_path


def test_state_kept_beside_the_link_moves_beside_the_target(tmp_path: Path) -> None:
    link, target, update = legacy_install(tmp_path)
    r2 = trio.run(install, str(update), link, TRUST, InstallOptions())
    assert r2.action == "updated"
    still_linked(link)
    assert (target.parent / ".game.p2pnode" / "state.json").exists()
    assert user_view(target, r2.displaced) == expected_user_view()
    r3 = trio.run(rollback, link, InstallOptions(mirrors=["/nonexistent/"]))
    assert r3.action == "rolled-back" and r3.bytes_cdn == 0
    assert trio.run(lambda: verify(link)).ok


def test_state_beside_the_link_on_another_filesystem_is_refused_with_the_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link, target, update = legacy_install(tmp_path)
    legacy = link.parent / ".game.p2pnode"
    rename = os.rename

    def cross_device(src: object, dst: object) -> None:
        if Path(str(src)) == legacy:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(linkeddest.os, "rename", cross_device)
    with pytest.raises(InstallError, match="kept beside the link") as info:
        trio.run(install, str(update), link, TRUST, InstallOptions())
    assert f"mv {legacy} {target.parent / '.game.p2pnode'}" in (info.value.fix or "")
    assert legacy.is_dir() and not (target.parent / ".game.p2pnode").exists()
    assert link.is_symlink() and os.readlink(link) == "../disk2/game"
    monkeypatch.undo()
    os.rename(legacy, target.parent / ".game.p2pnode")  # what the fix says
    assert trio.run(install, str(update), link, TRUST, InstallOptions()).action == "updated"


def test_a_link_an_earlier_switch_parked_in_the_state_is_moved_aside(tmp_path: Path) -> None:
    """Versions that did not resolve the link exchanged it away: the install directory became
    a real one and the link sat in the state directory as ``old``, failing every later switch
    with "Not a directory" after the trees were exchanged."""
    p1, p2, cdn = two_builds(tmp_path)
    dest = tmp_path / "game"
    trio.run(install, str(cdn / p1.manifest_path), dest, TRUST, InstallOptions())
    add_user_files(dest)
    sd = StateDir(dest)
    (tmp_path / "disk2").mkdir()
    sd.old.symlink_to(tmp_path / "disk2")
    r2 = trio.run(install, str(cdn / p2.manifest_path), dest, TRUST, InstallOptions())
    assert r2.action == "updated"
    assert user_view(dest, r2.displaced) == expected_user_view()
    assert os.readlink(sd.root / linkeddest.REPLACED_LINK) == str(tmp_path / "disk2")
    assert not os.path.lexists(sd.old)
    assert trio.run(rollback, dest, InstallOptions()).action == "rolled-back"


def test_an_update_that_failed_on_a_parked_link_is_completed_with_the_user_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What those versions left after "Not a directory": the trees exchanged, the old one (with
    the user's files) still at ``stage/``, the switch pending. The next command completes it."""
    import p2pnode.disk.switch as switch_module

    p1, p2, cdn = two_builds(tmp_path)
    dest = tmp_path / "game"
    trio.run(install, str(cdn / p1.manifest_path), dest, TRUST, InstallOptions())
    add_user_files(dest)
    sd = StateDir(dest)
    (tmp_path / "disk2").mkdir()
    sd.old.symlink_to(tmp_path / "disk2")
    monkeypatch.setattr(switch_module, "unpark_link", lambda old, root: None)  # as they did
    with pytest.raises(NotADirectoryError):
        trio.run(install, str(cdn / p2.manifest_path), dest, TRUST, InstallOptions())
    assert (sd.stage / "saves" / "slot1.sav").exists()  # the old tree, the user's files in it
    monkeypatch.undo()

    assert trio.run(lambda: verify(dest)).ok  # any command on the install completes it
    got = ours(dest, p2)
    assert len(got) == len(p2.manifest.files)
    assert all(
        got[f.path][0] == (cdn / "game/2/files" / f.path).read_bytes() for f in p2.manifest.files
    )
    displaced = {"settings.ini": next(p.name for p in dest.glob("settings.ini.user-*"))}
    assert user_view(dest, displaced) == expected_user_view()
    assert not os.path.lexists(sd.old) and not sd.stage.exists()
    assert os.readlink(sd.root / linkeddest.REPLACED_LINK) == str(tmp_path / "disk2")
