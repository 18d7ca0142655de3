"""The swarms a node serves, sans-IO: bitfields, and the trust rule for pushed manifests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from p2pnode.errors import ManifestError, SignatureError, UnknownKeyError
from p2pnode.release import keys
from p2pnode.release import rotation as R
from p2pnode.release.publish import publish
from p2pnode.swarm import wire as W
from p2pnode.swarm.offers import LEARN_INTERVAL, MAX_PUSHED, Offers
from tests.support.release import rotation

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


class Keys:
    """An app's keys as a node holds them (swarm/offers.py's AppKeys): a ring, and what
    learning would add (a chain fetched from the node's sources)."""

    def __init__(self, pinned: bytes, held: list[R.SignedRotation], more: list[R.SignedRotation]):
        self.pinned, self.held, self.more, self.asked = pinned, held, more, 0

    def ring(self) -> R.KeyRing:
        return R.follow({self.pinned}, "game", self.held)

    async def learn(self, key: bytes) -> R.KeyRing:
        self.asked += 1
        self.held = [*self.held, *self.more]
        return self.ring()


def push(p: Any) -> W.ManifestPush:
    return W.ManifestPush(p.manifest.id, p.signed.encode())


def test_pushed_manifests_follow_the_apps_rotation_chain(tmp_path: Path) -> None:
    """After a rotation: the new key's build is taken, the retired key's refused after its
    date; a key no chain names is unknown (the shell may learn, then check again)."""
    new, other = keys.generate_key(), keys.generate_key()
    until = int(time.time()) + 3600  # (the builds expire in a year)
    offers = Offers()
    offers.offer(release(tmp_path, "1").manifest)
    offers.keys["game"] = Keys(keys.public_key_bytes(KEY), [rotation(KEY, new, until)], [])
    by_new, by_old = release(tmp_path, "n", key=new), release(tmp_path, "o")
    assert offers.verify_push(push(by_new), now=until + 1).id == by_new.manifest.id
    assert offers.verify_push(push(by_old), now=until - 1).id == by_old.manifest.id
    with pytest.raises(SignatureError, match="retired"):
        offers.verify_push(push(by_old), now=until + 1)
    with pytest.raises(UnknownKeyError) as unknown:
        offers.verify_push(push(release(tmp_path, "x", key=other)))
    assert unknown.value.app == "game" and unknown.value.key == keys.public_key_bytes(other)


def test_a_forged_chain_teaches_nothing(tmp_path: Path) -> None:
    new = keys.generate_key()
    offers = Offers()
    offers.offer(release(tmp_path, "1").manifest)
    forged = rotation(KEY, new, 2_000_000_000, signer=new)  # the new key's word for the old
    offers.keys["game"] = Keys(keys.public_key_bytes(KEY), [forged], [])
    with pytest.raises(UnknownKeyError):
        offers.verify_push(push(release(tmp_path, "n", key=new)))


async def test_an_unknown_key_is_learnt_at_most_once_a_minute_per_app(tmp_path: Path) -> None:
    new = keys.generate_key()
    offers = Offers()
    offers.offer(release(tmp_path, "1").manifest)
    known = Keys(keys.public_key_bytes(KEY), [], [rotation(KEY, new, 2_000_000_000)])
    assert offers.may_learn("game", 0.0) is None  # no keys set: nothing to ask
    offers.keys["game"] = known
    asked = offers.may_learn("game", 100.0)
    assert asked is known and offers.may_learn("game", 100.0 + LEARN_INTERVAL - 1) is None
    assert offers.may_learn("game", 100.0 + LEARN_INTERVAL) is known
    assert keys.public_key_bytes(new) in await known.learn(keys.public_key_bytes(new))
    by_new = release(tmp_path, "n", key=new)
    assert offers.verify_push(push(by_new)).id == by_new.manifest.id
