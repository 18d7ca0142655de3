"""kill -9 in the middle of an install, then the same command: resumes and ends identical."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.state import StateDir
from p2pnode.disk.switch import local_chunks, recover
from p2pnode.node.install import InstallOptions, install
from p2pnode.node.verify import verify
from p2pnode.release import keys
from p2pnode.release.publish import publish
from tests.support.release import KEY, TRUST, make_release, tree


def journal_records(dest: Path) -> int:
    j = StateDir(dest).journal
    try:
        return max(0, (j.stat().st_size - 74) // 32)
    except FileNotFoundError:
        return 0


def test_kill_9_mid_install_then_rerun(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_release(src, big=40 << 20)
    cdn_root = tmp_path / "cdn"
    p = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    size = p.manifest.total_size
    n_chunks = len(p.manifest.unique_chunks())
    dest = tmp_path / "game"
    pub = keys.format_public_key(keys.public_key_bytes(KEY))
    with LocalCDN(cdn_root) as cdn:
        cmd = [
            sys.executable,
            "-m",
            "p2pnode",
            "install",
            cdn.url + p.manifest_path,
            "--dest",
            str(dest),
            "--trust",
            pub,
            "--json",
        ]
        proc = subprocess.Popen(
            [*cmd, "--max-download-rate", "16M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while journal_records(dest) < n_chunks // 3 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert journal_records(dest) >= n_chunks // 3
        assert not dest.exists()  # nothing switched in: the install dir never held a mix
        # What the killed install verified can be served to peers already, and only that.
        sd = StateDir(dest)
        local = local_chunks(sd, sd.load())
        ids = list(p.manifest.unique_chunks())
        bits = local.availability(p.manifest)
        have = [cid for i, cid in enumerate(ids) if bits[i >> 3] & (0x80 >> (i & 7))]
        assert 0 < len(have) < len(ids)
        assert all(local.read(cid) is not None for cid in have)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert tree(dest) == tree(src)
        total = cdn.bytes_sent(f"/{p.manifest.app}/1/files/")
        assert total <= 1.1 * size, (total, size)


def test_kill_9_at_random_moments_of_an_update_never_shows_a_mix(tmp_path: Path) -> None:
    """Whenever the update dies (staging, switching, harvesting), the install directory is
    exactly build 1 or exactly build 2 (besides the user's files, which are never lost); the
    same command then always ends at build 2."""
    src = tmp_path / "src"
    make_release(src, big=24 << 20)
    cdn_root = tmp_path / "cdn"
    p1 = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    v1 = tree(src)
    with open(src / "data" / "big.pak", "r+b") as f:
        f.seek(4 << 20)
        f.write(os.urandom(16 << 20))  # most of it: the update takes a while at 16M/s
    (src / "bin" / "run").unlink()
    (src / "new.txt").write_text("build 2")
    p2 = publish(src, app="game", version="2", build=2, key=KEY, out=cdn_root)
    v2 = tree(src)
    dest = tmp_path / "game"
    trio.run(install, str(cdn_root / p1.manifest_path), dest, TRUST, InstallOptions())
    mine = {"saves/slot1.sav": b"save", "data/user.cfg": b"cfg", "new.txt": b"a name build 2 takes"}
    for rel, data in mine.items():
        (dest / rel).parent.mkdir(exist_ok=True)
        (dest / rel).write_bytes(data)
    sd = StateDir(dest)

    def release_part(t: dict[str, tuple[bytes, int]] | None = None) -> dict[str, tuple[bytes, int]]:
        """A tree without the user's paths (new.txt is checked apart: both have one)."""
        t = tree(dest) if t is None else t
        return {k: v for k, v in t.items() if k not in mine and ".user-" not in k}

    def user_files_all_there() -> bool:
        places = (dest, sd.old, sd.stage)
        return all(
            any((d / rel).read_bytes() == data for d in places if (d / rel).is_file())
            or any(p.read_bytes() == data for p in dest.glob(rel + ".user-*"))
            for rel, data in mine.items()
        )

    cmd = [
        sys.executable,
        "-m",
        "p2pnode",
        "update",
        str(cdn_root / p2.manifest_path),
        "--dest",
        str(dest),
        "--max-download-rate",
        "40M",
        "--json",
    ]
    state_dir = StateDir(dest).root
    pristine = tmp_path / "pristine"
    shutil.copytree(dest, pristine / "tree")
    shutil.copytree(state_dir, pristine / "state")
    rng = random.Random(5)
    outcomes = set()
    for k in range(7):  # kill times spread over start-up, staging, switch and harvest
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3 + 0.25 * k + rng.uniform(0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        now = release_part()
        assert now in (release_part(v1), release_part(v2)), "a mix of two builds"
        assert user_files_all_there()
        outcomes.add("v2" if now == release_part(v2) else "v1")
        if now == release_part(v2):  # finished before the kill: start again from a pristine build 1
            shutil.rmtree(dest)
            shutil.rmtree(state_dir)
            shutil.copytree(pristine / "tree", dest)
            shutil.copytree(pristine / "state", state_dir)
    assert "v1" in outcomes  # some kills did interrupt the update
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    final = tree(dest)
    (aside,) = [k for k in final if k.startswith("new.txt.user-")]  # build 2 ships new.txt
    assert final.pop(aside)[0] == mine["new.txt"]
    for rel in ("saves/slot1.sav", "data/user.cfg"):
        assert final.pop(rel)[0] == mine[rel]
    assert final == v2
    assert trio.run(lambda: verify(dest)).ok


def test_recover_completes_or_forgets_a_switch(tmp_path: Path) -> None:
    """The pending-switch record decides, by inode, whether a killed switch happened."""
    src = tmp_path / "src"
    make_release(src, big=1 << 20)
    p1 = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    dest = tmp_path / "game"
    trio.run(install, str(tmp_path / "cdn" / p1.manifest_path), dest, TRUST, InstallOptions())
    sd = StateDir(dest)
    state = sd.load()
    # A switch that never happened: the record names an inode the install dir does not have.
    state.pending = {"op": "switch", "to": "00" * 32, "inode": -1, "history": []}
    sd.save(state)
    recover(sd, state)
    assert sd.load().pending is None and sd.load().current == p1.manifest.id.hex()
    # A switch that happened but whose bookkeeping was cut short.
    (src / "new.txt").write_text("2")
    p2 = publish(src, app="game", version="2", build=2, key=KEY, out=tmp_path / "cdn")
    sd.keep_manifest(p2.signed)
    state = sd.load()
    state.pending = {
        "op": "switch",
        "to": p2.manifest.id.hex(),
        "inode": os.stat(dest).st_ino,
        "history": [p1.manifest.id.hex()],
    }
    sd.save(state)
    recover(sd, state)
    after = sd.load()
    assert after.current == p2.manifest.id.hex() and after.history == [p1.manifest.id.hex()]
    assert after.pending is None
