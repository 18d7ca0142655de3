"""Publisher key rotation statements and the chains nodes follow (release/rotation.py)."""

from __future__ import annotations

import itertools
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.errors import ManifestError, SignatureError
from p2pnode.release import canonical, keys
from p2pnode.release import manifest as M
from p2pnode.release import rotation as R
from tests.support.release import small_manifest

NOW = int(time.time())


def pub(k: Ed25519PrivateKey) -> bytes:
    return keys.public_key_bytes(k)


def rotate(
    old: Ed25519PrivateKey, new: Ed25519PrivateKey, until: int, app: str = "game"
) -> R.SignedRotation:
    return R.sign_rotation(R.Rotation(app, pub(old), pub(new), until, NOW), old)


def build(key: Ed25519PrivateKey, n: int = 1) -> M.SignedManifest:
    return M.sign(small_manifest(key=pub(key), build=n), key)


def test_a_rotation_round_trips_and_only_its_old_key_signs_it() -> None:
    k0, k1 = keys.generate_key(), keys.generate_key()
    s = rotate(k0, k1, NOW + 60)
    back = R.parse_rotation(s.encode())
    assert back == s and back.check() == s.rotation
    assert R.parse_list(R.encode_list([s, s])) == [s, s]
    with pytest.raises(ValueError):
        R.sign_rotation(R.Rotation("game", pub(k0), pub(k1), NOW, NOW), k1)
    # the signature is over the statement under its own domain: a manifest's does not pass
    m = build(k0)
    forged = R.SignedRotation(s.rotation, s.raw, m.signature)
    with pytest.raises(SignatureError):
        forged.check()


@pytest.mark.parametrize(
    "obj",
    [
        {b"app": b"game", b"old": bytes(32), b"new": bytes(32), b"old_until": 1, b"created": 1},
        {b"app": b"../x", b"old": bytes(32), b"new": b"\1" * 32, b"old_until": 1, b"created": 1},
        {b"app": b"game", b"old": bytes(31), b"new": b"\1" * 32, b"old_until": 1, b"created": 1},
        {b"app": b"game", b"old": bytes(32), b"new": b"\1" * 32, b"old_until": -1, b"created": 1},
        {b"app": b"game", b"old": bytes(32), b"new": b"\1" * 32, b"old_until": 1},
    ],
)
def test_malformed_rotations_are_refused(obj: dict[bytes, object]) -> None:
    doc = canonical.encode({b"rotation": canonical.encode(obj), b"signature": bytes(64)})
    with pytest.raises(ManifestError):
        R.parse_rotation(doc)


def test_a_node_pinned_to_the_old_key_takes_the_new_key_and_the_old_until_its_date() -> None:
    k0, k1 = keys.generate_key(), keys.generate_key()
    ring = R.follow([pub(k0)], "game", [rotate(k0, k1, NOW + 60)])
    assert ring.until == {pub(k0): NOW + 60, pub(k1): None}
    assert ring.current(pub(k0)) == pub(k1)
    assert ring.verify(build(k1), now=NOW).key == pub(k1)
    assert ring.verify(build(k0), now=NOW + 59).key == pub(k0)
    with pytest.raises(SignatureError, match="retired"):
        ring.verify(build(k0), now=NOW + 60)  # the old key's date has passed
    # a kept build rolled back to was checked when it came: no date applies
    assert ring.verify(build(k0), now=NOW + 600, check_expiry=False).key == pub(k0)


def test_a_rotation_signed_by_someone_else_is_not_followed() -> None:
    k0, k1, thief = keys.generate_key(), keys.generate_key(), keys.generate_key()
    real = rotate(k0, k1, NOW + 60)
    # a statement naming k0 as old but signed by the thief's key
    raw = real.raw
    forged = R.SignedRotation(real.rotation, raw, keys.sign(thief, R.ROTATION_DOMAIN, raw))
    ring = R.follow([pub(k0)], "game", [forged, rotate(thief, k1, NOW)])
    assert ring.until == {pub(k0): None}
    with pytest.raises(SignatureError, match="not a trusted key"):
        ring.verify(build(k1), now=NOW)
    # a rotation of another app by the same key does not carry over
    assert R.follow([pub(k0)], "other", [real]).until == {pub(k0): None}


def test_chains_are_followed_in_any_order_and_bounded() -> None:
    ks = [keys.generate_key() for _ in range(R.MAX_HOPS + 3)]
    hops = [rotate(a, b, NOW + 10 * i) for i, (a, b) in enumerate(itertools.pairwise(ks))]
    two = R.follow([pub(ks[0])], "game", reversed(hops[:2]))  # a chain of two
    assert two.until == {pub(ks[0]): NOW, pub(ks[1]): NOW + 10, pub(ks[2]): None}
    assert two.current(pub(ks[0])) == pub(ks[2])
    assert two.verify(build(ks[2]), now=NOW + 100).key == pub(ks[2])
    with pytest.raises(SignatureError, match="retired"):
        two.verify(build(ks[1]), now=NOW + 10)
    long = R.follow([pub(ks[0])], "game", hops)
    assert len(long.until) == 1 + R.MAX_HOPS  # no further than MAX_HOPS keys past the pinned
    loop = R.follow([pub(ks[0])], "game", [*hops[:2], rotate(ks[2], ks[0], NOW)])
    assert loop.until[pub(ks[0])] == NOW and len(loop.learned) == 3


def test_the_first_rotation_by_a_key_wins_and_a_pinned_new_key_still_dates_the_old() -> None:
    k0, k1, thief = keys.generate_key(), keys.generate_key(), keys.generate_key()
    first, second = rotate(k0, k1, NOW + 60), rotate(k0, thief, NOW + 10**6)
    ring = R.follow([pub(k0)], "game", [first, second])
    assert pub(thief) not in ring and ring.until[pub(k0)] == NOW + 60
    both = R.follow([pub(k0), pub(k1)], "game", [first])  # state.json pinned both
    assert both.until == {pub(k0): NOW + 60, pub(k1): None}
