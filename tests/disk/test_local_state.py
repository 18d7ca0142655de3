"""Local state pieces without a network: units, layout, store, journal, stage, full disks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pnode.disk.stage import Journal
from p2pnode.disk.state import StateDir
from p2pnode.disk.store import ChunkStore
from p2pnode.errors import DiskSpaceError, InstallLockedError, NotInstalledError, UsageError
from p2pnode.node import install as install_mod
from p2pnode.node.install import InstallOptions, install, rollback
from p2pnode.node.verify import verify
from p2pnode.release import layout
from p2pnode.release.chunker import hash_chunk
from p2pnode.release.publish import publish
from p2pnode.units import parse_rate, parse_size
from tests.support.release import KEY, TRUST, make_release, tree


def test_rates_use_aria2_suffixes() -> None:
    assert parse_rate("40M") == 40 * 2**20
    assert parse_rate("512K") == 512 * 1024
    assert parse_rate("1.5G") == int(1.5 * 2**30)
    assert parse_rate("1000") == 1000
    assert parse_rate("0") is None
    assert parse_size("10MiB") == 10 * 2**20
    with pytest.raises(UsageError, match="rate"):
        parse_rate("fast")


def test_mirror_root_is_three_segments_up() -> None:
    assert layout.mirror_root_of("http://h:1/cdn/game/7/manifest.p2pm") == "http://h:1/cdn/"
    assert layout.mirror_root_of("https://h/game/channels/stable.p2pm") == "https://h/"
    assert layout.file_path("g", 3, "a b/c#d") == "g/3/files/a%20b/c%23d"


def test_store_verifies_reads_and_retains(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    data = os.urandom(1000)
    cid = hash_chunk(data)
    store.put(cid, data)
    assert store.get(cid) == data
    store.path(cid).write_bytes(b"x" + data[1:])  # damage at rest
    assert store.get(cid) is None and cid not in store  # damaged chunk dropped, not returned
    other = os.urandom(10)
    store.put(cid, data)
    store.put(hash_chunk(other), other)
    store.retain([cid])
    assert set(store.ids()) == {cid}


def test_journal_survives_torn_records_and_other_targets(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", b"A" * 32)
    j.open()
    j.record(b"1" * 32)
    j.record(b"2" * 32)
    j.close()
    with open(tmp_path / "j", "ab") as f:
        f.write(b"3" * 10)  # a record torn by a crash
    j = Journal(tmp_path / "j", b"A" * 32)
    j.open()
    assert j.done == {b"1" * 32, b"2" * 32} and not j.rebooted
    j.close()
    j = Journal(tmp_path / "j", b"B" * 32)  # another version: start over
    j.open()
    assert j.done == set()
    j.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_refused_up_front(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "src"
    make_release(src, big=20 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    dest = small_fs / "game"
    with pytest.raises(DiskSpaceError, match="MiB free"):
        trio.run(install, str(tmp_path / "cdn" / p.manifest_path), dest, TRUST, InstallOptions())
    assert not dest.exists()


def test_disk_filling_mid_install_loses_nothing(
    tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    make_release(src, big=16 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    location = str(tmp_path / "cdn" / p.manifest_path)
    dest = small_fs / "game"
    monkeypatch.setattr(install_mod, "check_space", lambda *a: None)  # let it run into ENOSPC
    with pytest.raises(DiskSpaceError, match="filled up"):
        trio.run(install, location, dest, TRUST, InstallOptions())
    assert not dest.exists()
    staged = len(Journal(StateDir(dest).journal, p.manifest.id).path.read_bytes()) // 32
    assert staged > 0
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    result = trio.run(install, location, dest, TRUST, InstallOptions())
    assert tree(dest) == tree(src)
    assert result.bytes_resumed > 0


def test_a_second_process_on_the_same_install_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_release(src, big=1 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    dest = tmp_path / "game"
    location = str(tmp_path / "cdn" / p.manifest_path)
    holder = StateDir(dest)
    holder.lock()
    try:
        with pytest.raises(InstallLockedError, match="another p2pnode process"):
            trio.run(install, location, dest, TRUST, InstallOptions())
    finally:
        holder.unlock()
    trio.run(install, location, dest, TRUST, InstallOptions())
    assert tree(dest) == tree(src)


def test_operations_on_nothing_installed_say_so(tmp_path: Path) -> None:
    from p2pnode.node.cli import main

    with pytest.raises(NotInstalledError):
        trio.run(rollback, tmp_path / "nothing", InstallOptions())
    with pytest.raises(NotInstalledError):
        trio.run(lambda: verify(tmp_path / "nothing"))
    assert main(["verify", "--dest", str(tmp_path / "nothing"), "--json"]) == 1


def test_space_refusal_states_the_whole_requirement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: "needs 40 MiB more, but ... has 99 MiB free" hid the 64 MiB reserve."""
    from types import SimpleNamespace

    from p2pnode.disk import switch as switch_mod

    src = tmp_path / "src"
    make_release(src, big=1 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    m = p.manifest
    stage = switch_mod.Stage(tmp_path / "stage", m, m.files)
    needed = {cid: locs[0][2] for cid, locs in stage.locations.items()}
    want = sum(len(stage.locations[c]) * n for c, n in needed.items())
    free = want + 10 * 2**20  # enough for the files, not for the reserve
    monkeypatch.setattr(
        switch_mod.shutil, "disk_usage", lambda _p: SimpleNamespace(free=free, total=0, used=0)
    )
    with pytest.raises(DiskSpaceError) as info:
        switch_mod.check_space(tmp_path / "game", stage, needed)
    need_mib = -(-(want + switch_mod.SPACE_RESERVE) // 2**20)
    assert f"needs {need_mib} MiB free" in info.value.message
    assert "64 MiB reserve" in info.value.message
    assert "free at least 54 MiB" in info.value.fix
