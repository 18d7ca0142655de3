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
from p2pnode.errors import CDNError, SignatureError
from p2pnode.node.install import install
from p2pnode.node.options import InstallOptions
from p2pnode.node.tracking import channel_manifest
from p2pnode.node.watch import WatchOptions, watch
from p2pnode.release import canonical, keys, layout
from p2pnode.release import manifest as M
from p2pnode.release import rotation as R
from tests.support.e2e import ADMIN, cli, registered_app
from tests.support.release import small_manifest, tree


def rotate_key(
    app: str, old: Path, new: str, until: int, url: str, out: Path | None
) -> dict[str, str]:
    args = ["app", "rotate-key", app, "--old-key", str(old), "--new-key", new]
    args += ["--old-until", str(until), "--url", url, "--token", ADMIN]
    args += ["--out", str(out)] if out is not None else []
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


def test_a_watcher_that_never_sees_a_new_key_build_learns_its_old_key_retired(
    tmp_path: Path, tracker_url: str
) -> None:
    """The gap a rotation for a leaked key must close: a node on the old key's build, told of
    no new-key build, hears of the rotation on its feed poll (real tracker and nginx), keeps it
    in keychain.json, and from then on refuses the old key's builds after ``old_until``."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    new_key = tmp_path / "k1.pem"
    new_pub = str(cli("keygen", str(new_key))["key"])
    dest = tmp_path / "game"
    until = int(time.time()) + 3600
    events: list[dict[str, object]] = []
    with LocalCDN(cdn_root) as cdn:
        common = ["--app", "game", "--out", str(cdn_root), "--tracker", tracker_url]
        common += ["--token", ADMIN, "--mirror", cdn.url]
        cli("publish", str(src), "--version", "1", "--build", "1", "--key", str(key), *common)

        async def main() -> None:
            opts = WatchOptions(
                "game", "stable", tracker_url, dest, [keys.parse_public_key(pub)],
                InstallOptions(tracker=tracker_url, identity_dir=tmp_path / "id"),
            )  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, opts, events.append)
                with trio.fail_after(60):
                    while not any(e["event"] == "installed" for e in events):
                        await trio.sleep(0.05)
                    # (no --out: the node hears it from its tracker alone)
                    args = ("game", key, new_pub, until, tracker_url, None)
                    await trio.to_thread.run_sync(rotate_key, *args)
                    while not any(e["event"] == "key-rotation" for e in events):
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

        trio.run(main)
    assert [e["learnt"] for e in events if e["event"] == "key-rotation"] == [1]
    assert (
        len(json.loads((tmp_path / ".game.p2pnode" / "keychain.json").read_text())["rotations"])
        == 1
    )
    old = keys.load_private_key(key)
    with pytest.raises(CDNError):  # before the date: trusted (it fails later, with no chunks)
        trio.run(install, str(write_build(tmp_path / "o3", old, 3)), dest, [],
                 InstallOptions(now=until - 60))  # fmt: skip
    with pytest.raises(SignatureError, match="retired"):
        trio.run(install, str(write_build(tmp_path / "o4", old, 4)), dest, [],
                 InstallOptions(now=until + 1))  # fmt: skip


def test_an_install_through_the_tracker_refuses_a_retired_keys_head(
    tmp_path: Path, tracker_url: str
) -> None:
    """The channel still points at an old-key build after the rotation's date: a fresh node
    trusting only the old key, told the chain by the feed, refuses it (with no new-key build
    anywhere and no rotations file on the CDN)."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    new_pub = str(cli("keygen", str(tmp_path / "k1.pem"))["key"])
    common = ["--app", "game", "--out", str(cdn_root), "--tracker", tracker_url]
    common += ["--token", ADMIN, "--mirror", "http://127.0.0.1:9/"]
    cli("publish", str(src), "--version", "1", "--build", "1", "--key", str(key), *common)
    until = int(time.time()) + 3600
    rotate_key("game", key, new_pub, until, tracker_url, None)

    async def main() -> None:
        location, data, chain = await channel_manifest(tracker_url, "game", "stable")
        assert chain is not None
        options = InstallOptions(tracker=tracker_url, key_chain=chain, now=until + 1)
        with pytest.raises(SignatureError, match="retired"):
            await install(location, tmp_path / "fresh", [keys.parse_public_key(pub)], options,
                          manifest_data=data)  # fmt: skip

    trio.run(main)
