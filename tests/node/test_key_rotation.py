"""A node pinned to an app's old publisher key follows a key rotation: through its tracker
(real processes: tracker, nginx CDN, the `p2pnode` and `tracker` CLIs), and from the CDN with no
tracker; it keeps what it learnt, and refuses the old key's builds after the rotation's date."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.demo.cdn import LocalCDN
from p2pnode.errors import SignatureError
from p2pnode.node.install import install
from p2pnode.node.options import InstallOptions
from p2pnode.release import canonical, keys, layout
from p2pnode.release import manifest as M
from p2pnode.release import rotation as R
from tests.support.e2e import ADMIN, cli, registered_app
from tests.support.release import small_manifest, tree


def rotate_key(app: str, old: Path, new: str, until: int, url: str, out: Path) -> dict[str, str]:
    args = ["app", "rotate-key", app, "--old-key", str(old), "--new-key", new]
    args += ["--old-until", str(until), "--url", url, "--token", ADMIN, "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "tracker", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def state_of(dest: Path) -> dict[str, object]:
    return dict(json.loads((dest.parent / f".{dest.name}.p2pnode" / "state.json").read_text()))


def test_install_and_update_through_the_tracker_after_a_rotation(
    tmp_path: Path, tracker_url: str
) -> None:
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    new_key = tmp_path / "k1.pem"
    new_pub = str(cli("keygen", str(new_key))["key"])
    dest, fresh = tmp_path / "game", tmp_path / "fresh"
    with LocalCDN(cdn_root) as cdn:
        common = ["--app", "game", "--out", str(cdn_root), "--tracker", tracker_url]
        common += ["--token", ADMIN, "--mirror", cdn.url]
        cli("publish", str(src), "--version", "1", "--build", "1", "--key", str(key), *common)
        out = cli("install", "game", "--tracker", tracker_url, "--dest", str(dest), "--trust", pub)
        assert out["build"] == 1

        until = int(time.time()) + 3600
        rotations = cdn_root / layout.rotations_path("game")
        answer = rotate_key("game", key, new_pub, until, tracker_url, rotations)
        assert answer["key"] == new_pub and rotations.exists()
        (src / "data" / "new.pak").write_bytes(b"build two" * 1000)
        cli("publish", str(src), "--version", "2", "--build", "2", "--key", str(new_key), *common)

        # the pinned node updates to the new key's build, and keeps the rotation
        out = cli("update", "game", "--tracker", tracker_url, "--dest", str(dest))
        assert out["build"] == 2 and tree(dest) == tree(src)
        state = state_of(dest)
        assert len(state["rotations"]) == 1  # type: ignore[arg-type]
        # a node that never installed, told only the old key, installs the new key's build
        out = cli("install", "game", "--tracker", tracker_url, "--dest", str(fresh), "--trust", pub)
        assert out["build"] == 2

        # a node with no tracker finds the rotation beside the release on the CDN
        plain = tmp_path / "plain"
        url = f"{cdn.url}{layout.manifest_path('game', 2)}"
        out = cli("install", url, "--dest", str(plain), "--trust", pub)
        assert out["build"] == 2

    # another process, later: the node kept what it learnt, so after the rotation's date a
    # build signed by the old key is refused even with no tracker and no rotations file
    old_build = write_build(tmp_path / "offline", keys.load_private_key(key), 3)
    rotations.unlink()
    with pytest.raises(SignatureError, match="retired"):
        trio.run(install, str(old_build), dest, [], InstallOptions(now=until + 1))


def write_build(root: Path, key: Ed25519PrivateKey, build: int) -> Path:
    """A signed manifest of "game" at its place in the CDN layout below ``root``; its chunk is
    never fetched by the tests that refuse it (trust is checked first)."""
    expires = int(time.time()) + 7 * 86400
    m = small_manifest(key=keys.public_key_bytes(key), build=build, expires=expires)
    path = root / layout.manifest_path("game", build)
    path.parent.mkdir(parents=True)
    path.write_bytes(M.sign(m, key).encode())
    return path


async def test_a_forged_rotation_beside_a_release_is_not_followed(tmp_path: Path) -> None:
    k0, k1, thief = keys.generate_key(), keys.generate_key(), keys.generate_key()
    path = write_build(tmp_path, thief, 1)
    real = R.sign_rotation(R.Rotation("game", *map(keys.public_key_bytes, (k0, k1)), 0, 0), k0)
    forged = R.Rotation("game", keys.public_key_bytes(k0), keys.public_key_bytes(thief), 0, 0)
    raw = canonical.encode(forged.to_obj())  # k0's words, the thief's signature
    fake = R.SignedRotation(forged, raw, keys.sign(thief, R.ROTATION_DOMAIN, raw))
    (tmp_path / layout.rotations_path("game")).write_bytes(R.encode_list([fake, real]))
    with pytest.raises(SignatureError, match="not a trusted key"):
        await install(str(path), tmp_path / "dest", [keys.public_key_bytes(k0)])
