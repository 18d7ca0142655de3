"""The install state never lies: a deleted or damaged install is restored, never "unchanged";
``status`` says so and lists what can be rolled back to offline; ``rollback --to``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from p2pnode.release import keys
from p2pnode.release.publish import publish
from tests.support.e2e import cli
from tests.support.release import KEY, make_release, tree

PUB = keys.format_public_key(keys.public_key_bytes(KEY))


def test_deleted_or_damaged_install_is_restored_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_release(src, big=2 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    manifest = str(tmp_path / "cdn" / p.manifest_path)
    dest = tmp_path / "game"
    v1 = tree(src)
    assert cli("install", manifest, "--dest", str(dest), "--trust", PUB)["action"] == "installed"
    assert cli("status", "--dest", str(dest))["install"] == "ok"

    shutil.rmtree(dest)
    assert cli("status", "--dest", str(dest))["install"] == "missing"
    again = cli("install", manifest, "--dest", str(dest))
    assert again["action"] == "reinstalled" and tree(dest) == v1

    (dest / "data" / "sub" / "small.txt").unlink()
    status = cli("status", "--dest", str(dest))
    assert status["install"] == "damaged" and status["missing"] == ["data/sub/small.txt"]
    again = cli("install", manifest, "--dest", str(dest))
    assert again["action"] == "repaired" and again["repaired"] == ["data/sub/small.txt"]
    assert tree(dest) == v1

    # Same size, new bytes: the mtime moved, so the file is hashed and found out.
    big = dest / "data" / "big.pak"
    big.write_bytes(b"\0" * big.stat().st_size)
    assert cli("update", manifest, "--dest", str(dest))["action"] == "repaired"
    assert tree(dest) == v1
    # Touched but intact: hashed once, still the build; the record learns the new mtime.
    os.utime(big, (1_000_000_000, 1_000_000_000))
    assert cli("install", manifest, "--dest", str(dest))["action"] == "unchanged"
    assert cli("status", "--dest", str(dest))["install"] == "ok"


def test_rollback_to_any_kept_build_offline_without_flip_flop(tmp_path: Path) -> None:
    src = tmp_path / "src"
    cdn = tmp_path / "cdn"
    make_release(src, big=1 << 20)
    builds = {}
    for b in (1, 2, 3):
        (src / "version.txt").write_text(f"build {b}\n")
        pub = publish(src, app="game", version=f"1.{b}", build=b, key=KEY, out=cdn)
        builds[b] = (str(cdn / pub.manifest_path), tree(src))
    dest = tmp_path / "game"
    cli("install", builds[1][0], "--dest", str(dest), "--trust", PUB)
    cli("update", builds[2][0], "--dest", str(dest))
    cli("update", builds[3][0], "--dest", str(dest))
    (dest / "saves").mkdir()
    (dest / "saves" / "slot.sav").write_bytes(b"mine")
    cdn.rename(tmp_path / "cdn-gone")  # everything below is offline

    status = cli("status", "--dest", str(dest))
    assert status["current"]["build"] == 3
    assert [(k["build"], k["offline"]) for k in status["kept"]] == [(2, True), (1, True)]

    def at(build: int) -> None:
        found = tree(dest)
        assert found.pop("saves/slot.sav")[0] == b"mine"  # the user's, carried every time
        assert found == builds[build][1]

    assert cli("rollback", "--dest", str(dest))["build"] == 2
    at(2)
    assert cli("rollback", "--dest", str(dest))["build"] == 1  # further back, not forth to 3
    at(1)
    refused = cli("rollback", "--dest", str(dest), ok=False)
    assert "no build older" in refused["_stderr"]
    assert cli("rollback", "--dest", str(dest), "--to", "3")["build"] == 3  # forth when asked
    at(3)
    refused = cli("rollback", "--dest", str(dest), "--to", "7", ok=False)
    assert "build 7 is not kept" in refused["_stderr"]
