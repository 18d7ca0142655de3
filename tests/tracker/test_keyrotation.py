"""Publisher key rotation on the tracker: kept once per old key, audited, served to nodes, and
publishing takes the new key's builds and the old key's until its date (tracker/keyrotation.py).
On SQLite and on real redis-server and PostgreSQL registries."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.tracker import TrackerRefusedError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release import rotation as R
from tests.support.tracker import ADMIN, APP, client_for
from tracker import Tracker

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def rotate(old: Ed25519PrivateKey, new: Ed25519PrivateKey, until: float) -> bytes:
    r = R.Rotation(APP, keys.public_key_bytes(old), keys.public_key_bytes(new), int(until), 0)
    return R.sign_rotation(r, old).encode()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "pg_url"))


async def test_rotation_moves_publishing_to_the_new_key_and_retires_the_old_on_its_date(
    make_tracker: Callable[..., Tracker],
    make_manifest: Callable[..., M.SignedManifest],
    publisher: Ed25519PrivateKey,
    store: str | None,
) -> None:
    clock = [time.time()]
    t = make_tracker(registry_url=store, clock=lambda: clock[0])
    client = client_for(t)
    await client.add_app(APP, keys.public_key_bytes(publisher))
    k1, k2, thief = keys.generate_key(), keys.generate_key(), keys.generate_key()
    await client.publish(APP, "stable", make_manifest(1).encode())
    with pytest.raises(TrackerRefusedError) as refused:  # k1 is nobody's key yet
        await client.publish(APP, "stable", make_manifest(2, key=k1).encode())
    assert refused.value.status == 403

    until = clock[0] + 3600
    answer = await client.rotate_key(APP, rotate(publisher, k1, until))
    assert answer["key"] == keys.format_public_key(keys.public_key_bytes(k1))
    assert answer["old_until"] == int(until) and answer["rotations"] == 1
    await client.publish(APP, "stable", make_manifest(2, key=k1).encode())
    await client.publish(APP, "stable", make_manifest(3).encode())  # old key, before its date

    for doc, status in (
        (rotate(thief, k2, until), 403),  # signed by a key that is not the app's
        (rotate(publisher, thief, until), 409),  # the old key was rotated already
        (b"not a rotation", 400),
    ):
        with pytest.raises(TrackerRefusedError) as refused:
            await client.rotate_key(APP, doc)
        assert refused.value.status == status
    forged = R.parse_rotation(rotate(publisher, k2, until))  # k0's words, thief's signature
    bad = R.SignedRotation(
        forged.rotation, forged.raw, keys.sign(thief, R.ROTATION_DOMAIN, forged.raw)
    )
    with pytest.raises(TrackerRefusedError) as refused:
        await client.rotate_key(APP, bad.encode())
    assert refused.value.status == 403

    # a chain of two: k1 hands over to k2
    await client.rotate_key(APP, rotate(k1, k2, clock[0] + 60))
    kept = R.parse_list(await client.rotations(APP))
    assert [s.rotation.new for s in kept] == [keys.public_key_bytes(k) for k in (k1, k2)]
    await client.publish(APP, "stable", make_manifest(4, key=k2).encode())

    clock[0] = until + 1  # past both old keys' dates
    for build, key in ((5, publisher), (6, k1)):
        with pytest.raises(TrackerRefusedError) as refused:
            await client.publish(
                APP, "stable", make_manifest(build, key=key, expires_in=7200).encode()
            )
        assert refused.value.status == 403 and "retired" in refused.value.message
    await client.publish(APP, "stable", make_manifest(7, key=k2, expires_in=7200).encode())

    page = (await client._http.get("/v1/audit", headers=AUTH)).json()
    rotated = [e for e in page["entries"] if e["action"] == "key-rotated"]
    assert len(rotated) == 2 and rotated[-1]["detail"]["old_until"] == int(until)
    assert rotated[-1]["token_id"] == "admin" and rotated[-1]["address"] == "127.0.0.1"
    await client._http.aclose()


async def test_rotations_of_an_app_answer_as_declared(client: Any) -> None:
    http: httpx.AsyncClient = client._http
    res = await http.get(f"/v1/apps/{APP}/rotations")
    assert res.status_code == 200 and R.parse_list(res.content) == []
    assert res.headers["content-type"] == "application/x-p2pnode-rotations"
    assert (await http.get("/v1/apps/nope/rotations")).status_code == 404
    res = await http.post(f"/v1/apps/{APP}/rotations", content=b"x")
    assert res.status_code == 401


def test_a_replica_drops_its_cached_rotations_when_another_adds_one(redis_url: str) -> None:
    from tracker.registry_redis import RedisRegistry

    one, two = RedisRegistry(redis_url), RedisRegistry(redis_url)
    try:
        one.add_app(APP, bytes(32), bytes(32), 0.0)
        assert one.rotations(APP) == []  # cached from here on
        assert two.add_rotation(APP, b"\1" * 32, b"statement", 1.0)
        assert not two.add_rotation(APP, b"\1" * 32, b"another", 2.0)  # one per old key
        one.data_version()  # what the registry watcher polls
        assert one.rotations(APP) == [b"statement"]
    finally:
        one.close()
        two.close()


async def test_the_feed_names_the_key_chain_and_a_long_poll_hears_of_a_rotation(
    tracker: Tracker,
    client: Any,
    make_manifest: Callable[..., M.SignedManifest],
    publisher: Ed25519PrivateKey,
) -> None:
    """Nodes learn of a rotation on their polls (no new-key build needed): every feed answer
    names the app's chain, and one parked on the feed answers at once, same seq."""
    await client.publish(APP, "stable", make_manifest(1).encode())
    head = await client.latest(APP, "stable")
    assert head is not None and head.key_chain is None
    assert "key_chain" not in (await client._http.get(f"/v1/apps/{APP}/channels/stable")).json()

    got: list[Any] = []

    async def poll() -> None:
        got.append(await client.latest(APP, "stable", since=head.seq, wait=30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await tracker.feed.until_waiting()
        with trio.fail_after(5):
            await client.rotate_key(APP, rotate(publisher, keys.generate_key(), time.time()))
    [woken] = got
    assert woken.seq == head.seq
    assert woken.key_chain == R.chain_digest(await client.rotations(APP))
    answer = (await client.latest(APP, "stable", node=b"\1" * 20)).key_chain
    assert answer == woken.key_chain  # the personal (rollout) answer too
