"""The swarms a node serves, sans-IO: bitfields, and the trust rule for pushed manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pnode.errors import ManifestError, SignatureError
from p2pnode.release import keys
from p2pnode.release.publish import publish
from p2pnode.swarm import wire as W
from p2pnode.swarm.offers import MAX_PUSHED, Offers

KEY = keys.generate_key()


def release(tmp_path: Path, name: str, app: str = "game", key: Any = KEY) -> Any:
    src = tmp_path / name / "src"
    src.mkdir(parents=True)
    (src / "a.txt").write_bytes(name.encode() * 1000)
    (src / "b.txt").write_bytes(b"shared" * 1000)
    return publish(src, app=app, version=name, build=1, key=key, out=tmp_path / name / "cdn")


def test_a_join_is_answered_with_what_is_held_or_n_0(tmp_path: Path) -> None:
    p = release(tmp_path, "1")
    offers = Offers()
    offers.offer(p.manifest)
    n = len(p.manifest.unique_chunks())
    held = bytes([0x80] + [0] * ((n + 7) // 8 - 1))
    assert offers.bitfield(p.manifest.id, lambda m: held) == W.Bitfield(p.manifest.id, n, held)
    assert offers.bitfield(bytes(32), lambda m: held) == W.Bitfield(bytes(32), 0, b"")


def test_a_pushed_manifest_is_trusted_only_under_a_key_of_an_app_served(tmp_path: Path) -> None:
    offers = Offers()
    offers.offer(release(tmp_path, "1").manifest)
    newer = release(tmp_path, "2")
    signed = newer.signed.encode()
    assert offers.verify_push(W.ManifestPush(newer.manifest.id, signed)).id == newer.manifest.id
    with pytest.raises(ManifestError, match="not the one its message names"):
        offers.verify_push(W.ManifestPush(bytes(32), signed))
    for foreign in (release(tmp_path, "k", key=keys.generate_key()), release(tmp_path, "a", "x")):
        with pytest.raises(SignatureError):
            offers.verify_push(W.ManifestPush(foreign.manifest.id, foreign.signed.encode()))


def test_pushed_manifests_are_bounded_oldest_forgotten(tmp_path: Path) -> None:
    offers = Offers()
    mine = release(tmp_path, "mine").manifest
    offers.offer(mine)
    pushed = [release(tmp_path, f"p{k}").manifest for k in range(MAX_PUSHED + 1)]
    for m in pushed:
        offers.take_pushed(m)
    assert pushed[0].id not in offers.manifests and pushed[0].id not in offers.index
    assert all(m.id in offers.chunks for m in pushed[1:]) and mine.id in offers.manifests
