"""End-to-end install, update, verify/repair and rollback against a real nginx."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.state import StateDir
from p2pnode.disk.switch import local_chunks
from p2pnode.errors import DowngradeError, InstallError, SignatureError
from p2pnode.node.install import InstallOptions, install, rollback
from p2pnode.node.verify import verify
from p2pnode.release import keys
from p2pnode.release.publish import publish
from tests.support.release import KEY, TRUST, make_release, tree


def test_install_update_verify_repair_rollback(tmp_path: Path, cdn: LocalCDN) -> None:
    src = tmp_path / "src"
    dest = tmp_path / "game"
    make_release(src)
    p1 = publish(src, app="game", version="1.0", build=1, key=KEY, out=cdn.root)
    v1 = tree(src)

    async def go_install(build_path: str, **kw: object) -> object:
        return await install(cdn.url + build_path, dest, TRUST, InstallOptions(**kw))  # type: ignore[arg-type]

    import trio

    r1 = trio.run(go_install, p1.manifest_path)
    assert tree(dest) == v1  # byte-identical, modes included
    assert r1.bytes_reused == 0
    # dup.pak's chunks are in big.pak: each unique chunk is fetched once.
    unique = sum(p1.manifest.unique_chunks().values())
    assert unique < p1.manifest.total_size
    assert r1.bytes_cdn <= unique * 1.01 + 64 * 1024
    sent_after_v1 = cdn.bytes_sent()

    # Build 2 changes one region of the large file.
    data = bytearray((src / "data" / "big.pak").read_bytes())
    data[5_000_000:5_200_000] = random.Random(9).randbytes(200_000)
    (src / "data" / "big.pak").write_bytes(bytes(data))
    p2 = publish(src, app="game", version="1.1", build=2, key=KEY, out=cdn.root)
    v2 = tree(src)
    old_ids = set(p1.manifest.unique_chunks())
    new_bytes = sum(n for cid, n in p2.manifest.unique_chunks().items() if cid not in old_ids)
    r2 = trio.run(go_install, p2.manifest_path)
    assert tree(dest) == v2
    fetched = cdn.bytes_sent() - sent_after_v1
    assert fetched < 1.2 * new_bytes, (fetched, new_bytes)
    assert r2.bytes_cdn < 1.2 * new_bytes
    assert r2.bytes_reused > 0
    # Build 1's chunks are all still here (tree + store): this node can seed build 1's swarm,
    # and serves build 2's swarm every chunk the two share.
    sd = StateDir(dest)
    local = local_chunks(sd, sd.load())
    n1 = len(p1.manifest.unique_chunks())
    full = bytes([0xFF] * (n1 // 8)) + (bytes([(0xFF << (8 - n1 % 8)) & 0xFF]) if n1 % 8 else b"")
    assert local.availability(p1.manifest) == full

    # A downgrade through install is refused and changes nothing.
    with pytest.raises(DowngradeError):
        trio.run(go_install, p1.manifest_path)
    assert tree(dest) == v2

    # Flip a byte: verify finds it, repair fetches at most two chunks.
    victim = dest / "data" / "big.pak"
    with open(victim, "r+b") as f:
        f.seek(8_000_000)
        b = f.read(1)
        f.seek(8_000_000)
        f.write(bytes([b[0] ^ 1]))
    (dest / "data" / "stray.tmp").write_bytes(b"not ours")
    mine = {"data/stray.tmp": tree(dest)["data/stray.tmp"]}  # no build lists it: the user's
    report = trio.run(lambda: verify(dest))
    assert not report.ok
    assert list(report.corrupt) == ["data/big.pak"] and report.bad_chunks == 1
    assert report.extra == [] and report.user_files == ["data/stray.tmp"]
    before = cdn.bytes_sent()
    report = trio.run(lambda: verify(dest, repair=True))
    assert report.ok and report.repaired == ["data/big.pak"]
    largest = max(c.length for _, c in p2.manifest.iter_chunks())
    assert cdn.bytes_sent() - before <= 2 * largest + 4096
    assert tree(dest) == {**v2, **mine}  # repair never touches the user's files
    assert trio.run(lambda: verify(dest)).ok

    # Rollback with nginx stopped: offline, from the tree and the store.
    cdn.stop()
    r3 = trio.run(rollback, dest, InstallOptions())
    assert r3.action == "rolled-back" and r3.bytes_cdn == 0
    assert tree(dest) == {**v1, **mine} and r3.kept_user_files == 1
    assert trio.run(lambda: verify(dest)).ok


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "p2pnode", *args], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_cli_rejects_tampered_and_foreign_manifests(tmp_path: Path, cdn: LocalCDN) -> None:
    src = tmp_path / "src"
    make_release(src, big=2 << 20)
    keyfile = tmp_path / "k.pem"
    pub = run_cli("keygen", str(keyfile)).stdout.strip()
    assert pub.startswith("ed25519:") and len(pub) == 8 + 64
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    out = json.loads(
        run_cli(
            "publish",
            str(src),
            "--app",
            "game",
            "--version",
            "1",
            "--build",
            "1",
            "--key",
            str(keyfile),
            "--out",
            str(cdn.root),
            "--json",
        ).stdout
    )
    manifest = cdn.root / out["manifest"]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")  # an existing non-p2pnode dir is not overwritten

    blob = bytearray(manifest.read_bytes())
    blob[len(blob) // 2] ^= 0x20
    bad = tmp_path / "bad.p2pm"
    bad.write_bytes(bytes(blob))
    proc = run_cli(
        "install",
        str(bad),
        "--dest",
        str(tmp_path / "new"),
        "--trust",
        pub,
        "--mirror",
        cdn.url,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "fix:" in proc.stderr
    assert not (tmp_path / "new").exists()

    other = keys.format_public_key(keys.public_key_bytes(keys.generate_key()))
    proc = run_cli(
        "install",
        cdn.url + out["manifest"],
        "--dest",
        str(tmp_path / "new"),
        "--trust",
        other,
        "--json",
        check=False,
    )
    assert proc.returncode != 0
    assert "not a trusted key" in proc.stderr
    assert json.loads(proc.stdout)["ok"] is False
    assert not (tmp_path / "new").exists()

    proc = run_cli(
        "install", cdn.url + out["manifest"], "--dest", str(dest), "--trust", pub, check=False
    )
    assert proc.returncode != 0 and "not a p2pnode install" in proc.stderr
    assert os.listdir(dest) == ["keep.txt"]

    proc = run_cli(
        "install",
        cdn.url + out["manifest"],
        "--dest",
        str(tmp_path / "ok"),
        "--trust",
        pub,
        "--json",
    )
    result = json.loads(proc.stdout)
    assert result["ok"] and result["bytes_cdn"] > 0 and result["bytes_reused"] == 0
    assert {"bytes_cdn", "bytes_reused", "seconds"} <= set(result)
    proc = run_cli("verify", "--dest", str(tmp_path / "ok"), "--json")
    assert json.loads(proc.stdout)["ok"] is True


def test_untrusted_and_equivocating_manifests_are_refused(tmp_path: Path, cdn: LocalCDN) -> None:
    import trio

    src = tmp_path / "src"
    make_release(src, big=1 << 20)
    p1 = publish(src, app="game", version="1", build=1, key=KEY, out=cdn.root)
    dest = tmp_path / "d"
    with pytest.raises(SignatureError):
        trio.run(install, cdn.url + p1.manifest_path, dest, [], InstallOptions())
    assert not dest.exists()
    trio.run(install, cdn.url + p1.manifest_path, dest, TRUST, InstallOptions())
    # Another manifest for the same build (published to another root) is equivocation.
    other_root = tmp_path / "other"
    (src / "extra.txt").write_text("x")
    p1b = publish(src, app="game", version="1", build=1, key=KEY, out=other_root)
    with pytest.raises(DowngradeError, match="two manifests"):
        trio.run(install, str(other_root / p1b.manifest_path), dest, TRUST, InstallOptions())
    # A different app into the same directory is refused.
    other_app = publish(src, app="other", version="1", build=5, key=KEY, out=other_root)
    with pytest.raises(InstallError, match="holds game"):
        trio.run(install, str(other_root / other_app.manifest_path), dest, TRUST, InstallOptions())
