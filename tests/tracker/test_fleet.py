"""The fleet view: which build each node runs, per app and per node, in memory and through the
API, with expiry, adoption curves, client versions and bounded Prometheus labels."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from p2pnode import __version__
from p2pnode.discovery.tracker import TrackerClient
from p2pnode.discovery.tracker_api import ANNOUNCE_DOMAIN, SIGNATURE_HEADER, sign_body
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import APP, client_for
from tracker import Tracker
from tracker import fleet as F
from tracker.fleet import FleetOutcome, MemoryFleet, Sighting
from tracker.fleet_pg import PGFleet
from tracker.fleet_redis import RedisFleet
from tracker.fleet_store import FleetStore, LocalFleet
from tracker.forecast import join_rate
from tracker.pg import PGDatabase

M1, M2 = b"\x01" * 32, b"\x02" * 32
T0 = 1_800_000_000.0


def node(i: int) -> bytes:
    return i.to_bytes(20, "big")


def builds(view: dict[str, Any] | None) -> dict[int, int]:
    assert view is not None
    return {b["build"]: b["nodes"] for b in view["builds"]}


def test_counts_move_with_each_node_and_never_count_a_node_twice() -> None:
    f = MemoryFleet()
    for i in range(10):
        f.seen(Sighting(node(i), "game", M1, 1, "0.1.0", T0))
    f.seen(Sighting(node(99), "game", None, None, None, T0))  # downloading its first build
    for i in range(4):  # four move to build 2, one of them twice
        f.seen(Sighting(node(i), "game", M2, 2, "0.2.0", T0 + 10))
    f.seen(Sighting(node(0), "game", M2, 2, None, T0 + 20))  # no version said: keeps 0.2.0
    view = f.app_view("game", T0)
    assert builds(view) == {2: 4, 1: 6}
    assert view is not None and view["nodes"] == 11 and view["updating"] == 1
    assert view["clients"] == {"0.1.0": 6, "0.2.0": 4, "unknown": 1}
    assert [b["share"] for b in view["builds"]] == [4 / 11, 6 / 11]
    assert view["builds"][0]["last_seen"] == T0 + 20
    # the same node in another app is another seat; its node view shows both
    f.seen(Sighting(node(0), "tool", M1 + b"", 1, "0.2.0", T0))
    assert f.app_view("nothing", T0) is None
    nv = f.node_view(node(0))
    assert nv is not None
    assert {(s["app"], s["build"], s["client"]) for s in nv["apps"]} == {
        ("game", 2, "0.2.0"),
        ("tool", 1, "0.2.0"),
    }
    assert f.node_view(node(12345)) is None


def test_outcomes_set_the_running_build_on_success_and_are_kept_per_node() -> None:
    f = MemoryFleet()
    f.seen(Sighting(node(1), "game", M1, 1, None, T0))
    f.outcome(FleetOutcome(node(1), "game", M2, "update", "download_failed", 1, 2, T0 + 5))
    assert builds(f.app_view("game", T0)) == {1: 1}  # a failure leaves it where it was
    f.outcome(FleetOutcome(node(1), "game", M2, "update", None, 1, 2, T0 + 9))
    assert builds(f.app_view("game", T0)) == {2: 1}  # a build nobody runs (and no curve) goes
    nv = f.node_view(node(1))
    assert nv is not None
    (seat,) = nv["apps"]
    assert seat["build"] == 2 and seat["last_seen"] == T0 + 9
    assert seat["last_outcome"] == {
        "kind": "update",
        "outcome": "success",
        "code": None,
        "to_build": 2,
        "at": T0 + 9,
    }
    assert [o["code"] for o in nv["recent_outcomes"]] == [None, "download_failed"]


def test_unseen_nodes_expire_a_slice_at_a_time_and_their_slots_are_reused() -> None:
    f = MemoryFleet(ttl=100)
    for i in range(10):
        f.seen(Sighting(node(i), "game", M1, 1, "0.1.0", T0 + (50 if i < 3 else 0)))
    assert f.gc(T0 + 120, budget=5) == 2  # the first five slots: three are fresh
    assert len(f) == 8  # slots 0-2 were seen later; 3 and 4 went
    f.gc(T0 + 120, budget=5)
    assert len(f) == 3 and builds(f.app_view("game", T0)) == {1: 3}
    assert f.app_view("game", T0)["clients"] == {"0.1.0": 3}  # type: ignore[index]
    f.seen(Sighting(node(50), "game", M2, 2, None, T0 + 130))
    assert len(f._keys) == 10  # a freed slot was reused
    view = f.app_view("game", T0)
    assert view is not None and view["nodes"] == 4 and view["updating"] == 0


def test_adoption_curves_are_sampled_per_bucket_and_bounded() -> None:
    f = MemoryFleet(bucket=60, points=3)
    for minute in range(5):
        now = T0 + 60 * minute
        f.seen(Sighting(node(minute), "game", M1, 1, None, now))
        f.gc(now)
        f.gc(now + 1)  # same bucket: no second sample
    view = f.app_view("game", T0 + 300)
    assert view is not None
    (b,) = view["builds"]
    start = int(T0) // 60 * 60
    # the last three samples, then the count now
    assert b["adoption"] == [[start + 60 * m, m + 1] for m in (2, 3, 4)] + [[int(T0) + 300, 5]]


def test_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "MAX_RELEASES", 2)
    monkeypatch.setattr(F, "MAX_CLIENTS", 3)
    f = MemoryFleet()
    f.seen(Sighting(node(1), "game", M1, 1, "1.0", T0))
    f.seen(Sighting(node(2), "game", M2, 2, "2.0", T0))
    f.seen(Sighting(node(3), "game", b"\x03" * 32, 3, None, T0))  # no room: counted updating
    assert builds(f.app_view("game", T0)) == {1: 1, 2: 1}
    f.seen(Sighting(node(1), "game", M2, 2, None, T0 + 1))  # build 1 is run by nobody now
    f.seen(Sighting(node(3), "game", b"\x03" * 32, 3, None, T0 + 2))  # it makes room
    assert builds(f.app_view("game", T0)) == {3: 1, 2: 2}
    assert f.app_view("game", T0)["clients"] == {  # type: ignore[index]
        "1.0": 1,
        "other": 1,
        "unknown": 1,
    }
    g = f.gauges()
    assert sorted(g["builds"]) == [("game", M2.hex(), 2, 2), ("game", (b"\x03" * 32).hex(), 3, 1)]


async def announce_done(client: TrackerClient, k: Any, m: M.SignedManifest, **kw: Any) -> None:
    await client.announce(
        k, app=APP, manifest_id=m.id, port=7000, size=100, left=0, numwant=0, **kw
    )


async def test_the_api_answers_per_build_and_per_node_with_client_versions(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    one, two = make_manifest(1), make_manifest(2)
    for m in (one, two):
        await client.publish(APP, "stable", m.encode())
    ks = [keys.generate_key() for _ in range(5)]
    for k in ks:
        await announce_done(client, k, one)  # the first answer says the tracker takes client
        await announce_done(client, k, one)  # ... so this one carries it
    for k in ks[:2]:
        await announce_done(client, k, two)
    await client.announce(
        keys.generate_key(), app=APP, manifest_id=two.id, port=0, size=100, left=60, numwant=0
    )
    http = client._http
    old = {"app": APP, "manifest": one.id.hex(), "port": 0, "size": 100, "left": 0}
    body, sig = sign_body(keys.generate_key(), ANNOUNCE_DOMAIN, old)  # a node before "client"
    assert (
        await http.post("/v1/announce", content=body, headers={SIGNATURE_HEADER: sig})
    ).is_success
    view = (await http.get(f"/v1/apps/{APP}/fleet")).json()
    assert {b["build"]: b["nodes"] for b in view["builds"]} == {2: 2, 1: 4}
    assert view["nodes"] == 7 and view["updating"] == 1
    assert view["clients"] == {__version__: 6, "unknown": 1}
    assert [b["version"] for b in view["builds"]] == ["1.2", "1.1"]
    nid = keys.node_id_of(keys.public_key_bytes(ks[0]))
    outcome = {
        "app": APP,
        "manifest": two.id.hex(),
        "to_build": 2,
        "from_build": 1,
        "kind": "update",
        "outcome": "failure",
        "code": "insufficient_storage",
    }
    await client.report_outcome(ks[0], outcome)
    got = (await http.get(f"/v1/nodes/{nid.hex()}")).json()
    assert got["node_id"] == nid.hex()
    (seat,) = got["apps"]
    assert (seat["app"], seat["build"], seat["client"]) == (APP, 2, __version__)
    assert seat["last_outcome"]["code"] == "insufficient_storage"
    assert got["recent_outcomes"][0]["from_build"] == 1
    for bad, status in (
        ("zz" * 20, 400),
        ("ab", 400),
        ("ab " * 13 + "a", 400),  # 40 characters that fromhex would take
        (os.urandom(20).hex(), 404),
        (nid.hex().upper(), 200),
    ):
        assert (await http.get(f"/v1/nodes/{bad}")).status_code == status
    assert (await http.get("/v1/apps/nope/fleet")).status_code == 404
    assert (await http.get("/v1/apps/../fleet")).status_code in (400, 404)
    text = (await http.get("/metrics")).text
    assert f'tracker_fleet_nodes{{app="{APP}",build="2",manifest="{two.id.hex()}"}} 2.0' in text
    assert f'tracker_fleet_client_nodes{{app="{APP}",client="{__version__}"}} 6.0' in text
    assert f'tracker_fleet_updating_nodes{{app="{APP}"}} 1.0' in text
    assert nid.hex() not in text  # never a label per node


@pytest.fixture(params=["memory", "redis", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[FleetStore]:
    """The same fleet behind each store: in memory, in a real redis-server, in PostgreSQL."""
    s: FleetStore
    if request.param == "memory":
        s = LocalFleet(MemoryFleet(ttl=100, bucket=60))
    elif request.param == "postgres":
        db = PGDatabase(request.getfixturevalue("pg_url"))
        request.addfinalizer(db.close)
        s = PGFleet(db, ttl=100, bucket=60)
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisFleet(url, prefix="t:", ttl=100, bucket=60)
    yield s
    s.close()


async def test_every_store_counts_expires_and_samples_alike(store: FleetStore) -> None:
    for i in range(6):
        store.seen(Sighting(node(i), "game", M1, 1, "0.1.0", T0 + (50 if i < 2 else 0)))
    store.seen(Sighting(node(9), "game", None, None, None, T0))
    for i in range(2):
        store.seen(Sighting(node(i), "game", M2, 2, "0.2.0", T0 + 60))
    store.outcome(FleetOutcome(node(1), "game", M2, "update", "network_timeout", 1, 3, T0 + 61))
    await store.gc(T0 + 61)  # a sample, nothing expired yet
    view = await store.app_view("game", T0 + 62)
    assert builds(view) == {2: 2, 1: 4}
    assert view is not None and view["updating"] == 1 and view["nodes"] == 7
    assert view["clients"] == {"0.1.0": 4, "0.2.0": 2, "unknown": 1}
    assert [b["adoption"] for b in view["builds"]] == [
        [[int(T0 + 61) // 60 * 60, 2], [int(T0 + 62), 2]],
        [[int(T0 + 61) // 60 * 60, 4], [int(T0 + 62), 4]],
    ]
    nv = await store.node_view(node(1))
    assert nv is not None
    (seat,) = nv["apps"]
    assert (seat["build"], seat["client"], seat["last_seen"]) == (2, "0.2.0", int(T0 + 61))
    assert seat["last_outcome"]["code"] == "network_timeout"
    assert seat["last_outcome"]["to_build"] == 3
    assert [o["code"] for o in nv["recent_outcomes"]] == ["network_timeout"]
    g = await store.gauges()
    assert sorted(g["builds"]) == [("game", M1.hex(), 1, 4), ("game", M2.hex(), 2, 2)]
    assert g["updating"] == [("game", 1)]
    while await store.gc(T0 + 140):  # the ones seen at T0 are past ttl=100
        pass
    view = await store.app_view("game", T0)
    assert builds(view) == {2: 2, 1: 0}  # build 1's curve keeps it listed
    assert view is not None and view["clients"] == {"0.2.0": 2} and view["updating"] == 0
    assert await store.node_view(node(4)) is None
    assert await store.app_view("other", T0) is None


async def test_every_store_counts_nodes_first_seen_downloading_as_joins(
    store: FleetStore,
) -> None:
    store.seen(Sighting(node(1), "game", M1, 1, None, T0))  # a whole build: it ran before
    store.seen(Sighting(node(2), "game", None, None, None, T0))  # downloading: a join
    await store.gc(T0 + 1)  # a sample
    store.seen(Sighting(node(2), "game", M1, 1, None, T0 + 60))  # the same node, done
    store.outcome(FleetOutcome(node(3), "game", M1, "install", "network_timeout", 0, 1, T0 + 60))
    store.seen(Sighting(node(4), "tool", None, None, None, T0 + 60))  # another app's
    await store.gc(T0 + 61)
    view = await store.app_view("game", T0 + 62)
    assert view is not None
    assert view["joined"] == [[int(T0), 1], [int(T0) + 60, 2], [int(T0) + 62, 2]]
    assert join_rate(view["joined"], T0 + 62) == 0  # a minute says nothing
    tool = await store.app_view("tool", T0 + 62)
    assert tool is not None and tool["joined"][-1] == [int(T0) + 62, 1]


@pytest.mark.parametrize("where", ["redis", "postgres", "redis+postgres"])
async def test_the_fleet_of_replicas_is_shared_and_in_postgres_outlives_them(
    where: str,
    request: pytest.FixtureRequest,
    make_tracker: Callable[..., Tracker],
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """Replicas on Redis (swarm and registry), on PostgreSQL (registry, no --redis) or on both
    (swarm in Redis, registry in PostgreSQL) answer for the whole fleet; whenever the registry
    is in PostgreSQL the fleet is kept there, so a replica started afterwards still does."""
    swarm = str(request.getfixturevalue("redis_url")) if "redis" in where else None
    url = str(request.getfixturevalue("pg_url")) if "postgres" in where else swarm
    a, b = (make_tracker(n, redis_url=swarm, registry_url=url) for n in "ab")
    assert isinstance(a.fleet.store, PGFleet if "postgres" in where else RedisFleet)
    ca, cb = client_for(a), client_for(b)
    await ca.add_app(APP, keys.public_key_bytes(publisher))
    one = make_manifest(1)
    await ca.publish(APP, "stable", one.encode())
    ks = [keys.generate_key() for _ in range(4)]
    for i, k in enumerate(ks):
        await announce_done(ca if i % 2 else cb, k, one)
    async with trio.open_nursery() as nursery:
        for t in (a, b):  # each replica's write-behind, as `tracker serve` runs it
            await nursery.start(t.fleet.store.run)
        for c in (ca, cb):
            view = (await c._http.get(f"/v1/apps/{APP}/fleet")).json()
            # what the other replica was told arrives with its next write (FLUSH_S)
            with trio.fail_after(5):
                while view["nodes"] < 4:
                    await trio.sleep(0.05)
                    view = (await c._http.get(f"/v1/apps/{APP}/fleet")).json()
            assert {x["build"]: x["nodes"] for x in view["builds"]} == {1: 4}
        nursery.cancel_scope.cancel()
    if "postgres" in where:
        later = client_for(make_tracker("c", registry_url=url))  # no Redis at all
        view = (await later._http.get(f"/v1/apps/{APP}/fleet")).json()
        assert {x["build"]: x["nodes"] for x in view["builds"]} == {1: 4}
        await later._http.aclose()
    if swarm is not None and url != swarm:  # nothing of the fleet went to Redis
        import redis

        with redis.Redis.from_url(swarm) as r:
            assert not r.keys("trk:fleet:*")
    for c in (ca, cb):
        await c._http.aclose()
