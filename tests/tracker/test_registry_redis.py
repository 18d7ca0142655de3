"""The registry in Redis or PostgreSQL (``--registry``): replicas with separate DIRs share apps,
manifests and channels; the same semantics as the SQLite registry; atomic publishes across
replicas; 503 when Redis is down, with nothing half-applied."""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from p2pnode.demo.tracker import LocalTracker
from p2pnode.discovery.tracker import TrackerClient, TrackerRefusedError
from p2pnode.errors import P2PNodeError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import (
    ADMIN,
    APP,
    STORES,
    RedisProcess,
    client_for,
    free_port,
    long_poll_woken,
    registry_url_for,
)
from tracker import Tracker, serve_tracker
from tracker.backend import Publication
from tracker.errors import Conflict, RegistryUnavailable
from tracker.pg import PGDatabase
from tracker.registry_pg import PGRegistry
from tracker.registry_redis import RedisRegistry
from tracker.registry_sqlite import SQLiteRegistry

#: The shared registries: every replica on any host reads and writes the same one.
SHARED = ("redis", "postgres")


def shared_registry(store: str, url: str, prefix: str = "trk:") -> Any:
    """One replica's registry on that server (``prefix``: Redis keys)."""
    return PGRegistry(PGDatabase(url)) if store == "postgres" else RedisRegistry(url, prefix=prefix)


def open_registry(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A registry of that kind, fresh (a new redis-server or PostgreSQL database)."""
    url = registry_url_for(request, store)
    return SQLiteRegistry(tmp_path / "r.db") if url is None else shared_registry(store, url)


@pytest.fixture
def replicas(make_tracker: Callable[..., Tracker]) -> Callable[..., Tracker]:
    """``replica(name, registry_url, redis_url=None)``: a tracker with its OWN data dir."""

    def make(name: str, registry_url: str, redis_url: str | None = None) -> Tracker:
        return make_tracker(name, redis_url, "r1:", registry_url=registry_url)

    return make


async def start(nursery: trio.Nursery, t: Tracker, token: str = ADMIN) -> TrackerClient:
    host, port = await nursery.start(functools.partial(serve_tracker, t, "127.0.0.1", 0))
    return TrackerClient(f"http://{host}:{port}", token=token)


@pytest.mark.parametrize("store", SHARED)
async def test_replicas_on_separate_dirs_share_the_registry(
    store: str,
    request: pytest.FixtureRequest,
    replicas: Callable[..., Tracker],
    redis_url: str,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
    tmp_path: Path,
) -> None:
    url = registry_url_for(request, store)
    assert url is not None
    a, b = replicas("a", url, redis_url), replicas("b", url, redis_url)
    assert not (tmp_path / "a" / "registry.db").exists()
    b1, b2, b3 = make_manifest(1), make_manifest(2), make_manifest(3)
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)

        # an app added on A is visible on B; its publisher token works on B
        reg = await ca.add_app(APP, keys.public_key_bytes(publisher))
        assert [x["app"] for x in (await cb._request("GET", "/v1/apps")).json()["apps"]] == [APP]
        with pytest.raises(TrackerRefusedError) as dup:
            await cb.add_app(APP, keys.public_key_bytes(publisher))
        assert dup.value.status == 409
        pb = TrackerClient(cb.base_url, token=str(reg["publisher_token"]))

        # a publish on A reaches a long-poll on B within a second
        got, delay = await long_poll_woken(
            b, cb, lambda: ca.publish(APP, "stable", b1.encode()), since=0
        )
        assert got.manifest_id == b1.id and delay < 1.0

        # B serves the manifest A stored
        assert await cb.fetch_manifest(b1.id) == b1.encode()

        # an older or equal build is refused on B after A's publish, and nothing changes
        head = await cb.latest(APP, "stable")
        assert head is not None and head.manifest_id == b1.id
        for again in (b1, make_manifest(1, size=2000), make_manifest(0)):
            with pytest.raises(TrackerRefusedError) as old:
                await pb.publish(APP, "stable", again.encode())
            assert old.value.status == 409 and "not newer" in str(old.value)
        assert await ca.latest(APP, "stable") == head
        assert len(await ca.history(APP, "stable")) == 1

        # B publishes with the publisher token; promote and rollback on B are seen on A at once
        seq2 = (await pb.publish(APP, "stable", b2.encode()))["seq"]
        beta = await pb.promote(APP, "beta", b1.id)
        got_beta = await ca.latest(APP, "beta")
        assert got_beta is not None and got_beta.manifest_id == b1.id
        assert got_beta.seq == beta.seq == seq2 + 1
        rolled = await pb.rollback(APP, "stable")
        assert rolled.manifest_id == b1.id and rolled.seq == seq2 + 2
        seen = await ca.latest(APP, "stable")
        assert seen is not None and seen.manifest_id == b1.id and seen.build == 1
        # a rolled-back build number cannot come back, on either replica
        with pytest.raises(TrackerRefusedError):
            await ca.publish(APP, "stable", b2.encode())
        hist = await ca.history(APP, "stable")
        assert [(e["action"], e["build"]) for e in hist] == [
            ("rollback", 1),
            ("publish", 2),
            ("publish", 1),
        ]
        assert hist[0]["seq"] > hist[1]["seq"] > hist[2]["seq"]
        assert hist[1]["actor"] == "publisher" and hist[2]["actor"] == "admin"
        info = (await ca._request("GET", f"/v1/apps/{APP}")).json()
        assert [c["channel"] for c in info["channels"]] == ["beta", "stable"]

        # nodes announce on either replica: B knows the build A published
        k = keys.generate_key()
        r = await cb.announce(k, app=APP, manifest_id=b1.id, port=7000, numwant=5)
        assert r.peers == []
        stats = (await ca._request("GET", "/v1/stats")).json()
        assert [(s["build"], s["version"]) for s in stats["releases"]] == [(1, "1.1")]
        nursery.cancel_scope.cancel()

    # a replica restarted on a fresh, empty DIR keeps everything
    c = replicas("a-again", url, redis_url)
    async with trio.open_nursery() as nursery:
        cc = await start(nursery, c)
        head = await cc.latest(APP, "stable")
        assert head is not None and head.manifest_id == b1.id and head.seq == seq2 + 2
        assert await cc.history(APP, "stable") == hist
        assert await cc.fetch_manifest(b2.id) == b2.encode()
        pc = TrackerClient(cc.base_url, token=str(reg["publisher_token"]))
        res = await pc.publish(APP, "stable", b3.encode())
        assert res["seq"] == seq2 + 3
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("store", SHARED)
async def test_concurrent_publishes_of_one_build_exactly_one_wins(
    store: str,
    request: pytest.FixtureRequest,
    replicas: Callable[..., Tracker],
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    url = registry_url_for(request, store)
    assert url is not None
    a, b = replicas("a", url), replicas("b", url)
    async with trio.open_nursery() as nursery:
        ca, cb = await start(nursery, a), await start(nursery, b)
        await ca.add_app(APP, keys.public_key_bytes(publisher))
        for build in range(1, 9):
            # two different manifests with the same build number, one per replica
            ma, mb = make_manifest(build, size=1000), make_manifest(build, size=1001)
            outcome: dict[str, Any] = {}

            async def push(
                out: dict[str, Any], name: str, c: TrackerClient, m: M.SignedManifest
            ) -> None:
                try:
                    out[name] = (await c.publish(APP, "stable", m.encode()))["manifest_id"]
                except TrackerRefusedError as exc:
                    out[name] = exc.status

            async with trio.open_nursery() as race:
                race.start_soon(push, outcome, "a", ca, ma)
                race.start_soon(push, outcome, "b", cb, mb)
            assert sorted(outcome.values(), key=str) in (
                sorted([ma.id.hex(), 409], key=str),
                sorted([mb.id.hex(), 409], key=str),
            ), outcome
            winner = next(v for v in outcome.values() if v != 409)
            for c in (ca, cb):
                head = await c.latest(APP, "stable")
                assert head is not None and head.manifest_id.hex() == winner
        hist = await cb.history(APP, "stable")
        assert [e["build"] for e in hist] == list(range(8, 0, -1))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("store", SHARED)
def test_racing_threads_never_accept_a_build_twice(
    store: str, request: pytest.FixtureRequest
) -> None:
    """Sixteen threads on two registries publish random builds to one channel: in seq order
    the accepted builds strictly increase, and each refusal names a build at least as high."""
    url = registry_url_for(request, store)
    assert url is not None
    regs = [shared_registry(store, url, "race:") for _ in range(2)]
    regs[0].add_app(APP, b"k" * 32, b"t" * 32, 1.0)
    accepted: list[tuple[int, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rnd = random.Random(i)
        reg = regs[i % 2]
        try:
            for _ in range(40):
                build = rnd.randrange(1, 200)
                mid = bytes([i]) + build.to_bytes(4, "big") + bytes(27)
                try:
                    seq = reg.publish(
                        Publication(APP, "stable", mid, build, f"v{build}", 1, b"x", time.time(),
                                    "admin")
                    )  # fmt: skip
                except Conflict:
                    continue
                with lock:
                    accepted.append((seq, build))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    builds = [b for _, b in sorted(accepted)]
    assert builds == sorted(set(builds)) and len(builds) >= 2
    head = regs[1].head(APP, "stable")
    assert head is not None and head.build == builds[-1] and head.seq == max(accepted)[0]
    assert [e["build"] for e in regs[0].history(APP, "stable", limit=1000)] == builds[::-1]
    for r in regs:
        r.close()


@pytest.mark.parametrize("kind", STORES)
def test_the_registries_behave_alike(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same sequence of changes on any registry gives the same answers."""
    reg = open_registry(kind, request, tmp_path)
    mids = [bytes([n]) * 32 for n in range(6)]
    reg.add_app("a", b"k" * 32, b"t" * 32, 10.0)
    reg.add_app("b", b"K" * 32, b"T" * 32, 11.0)
    with pytest.raises(Conflict):
        reg.add_app("a", b"x" * 32, b"y" * 32, 12.0)
    assert [x.name for x in reg.list_apps()] == ["a", "b"]
    assert reg.get_app("a").key == b"k" * 32 and reg.get_app("a").token_hash == b"t" * 32
    assert reg.get_app("nope") is None and reg.head("a", "stable") is None

    def pub(app: str, ch: str, n: int, build: int, now: float) -> int:
        return int(
            reg.publish(
                Publication(
                    app, ch, mids[n], build, f"1.{build}", 100 + n, b"signed %d" % n, now, "admin"
                )
            )
        )

    assert pub("a", "stable", 0, 5, 100.0) == 1
    assert pub("a", "stable", 1, 7, 101.0) == 2
    assert pub("b", "stable", 2, 3, 102.0) == 3
    for build in (7, 6, 1):
        with pytest.raises(Conflict):
            pub("a", "stable", 3, build, 103.0)
    assert reg.get_manifest(mids[3]) is None and reg.manifest_info(mids[3]) is None
    # promote a build of another channel, then roll back twice
    assert reg.move(app="a", channel="beta", manifest_id=mids[0], action="promote", now=104.0,
                    actor="publisher") == 4  # fmt: skip
    with pytest.raises(Conflict):  # b's build is not a build of a
        reg.move(app="a", channel="beta", manifest_id=mids[2], action="promote", now=105.0,
                 actor="admin")  # fmt: skip
    assert reg.previous_head("a", "stable") == mids[0]
    assert reg.previous_head("a", "beta") is None
    assert reg.move(app="a", channel="stable", manifest_id=mids[0], action="rollback", now=106.0,
                    actor="admin") == 5  # fmt: skip
    assert reg.previous_head("a", "stable") == mids[1]
    with pytest.raises(Conflict):  # max_build is 7 even after the rollback
        pub("a", "stable", 4, 7, 107.0)
    assert pub("a", "stable", 4, 2**62, 108.0) == 6  # exact comparison at the top of the range
    with pytest.raises(Conflict):
        pub("a", "stable", 5, 2**62 - 1, 109.0)

    head = reg.head("a", "stable")
    assert (head.seq, head.manifest_id, head.build, head.version, head.updated) == (
        6,
        mids[4],
        2**62,
        f"1.{2**62}",
        108.0,
    )
    assert [(h.channel, h.seq, h.build) for h in reg.channels("a")] == [
        ("beta", 4, 5),
        ("stable", 6, 2**62),
    ]
    hist = reg.history("a", "stable")
    assert [(e["seq"], e["action"], e["build"], e["at"], e["actor"]) for e in hist] == [
        (6, "publish", 2**62, 108.0, "admin"),
        (5, "rollback", 5, 106.0, "admin"),
        (2, "publish", 7, 101.0, "admin"),
        (1, "publish", 5, 100.0, "admin"),
    ]
    assert hist[0]["manifest_id"] == mids[4].hex() and hist[0]["version"] == f"1.{2**62}"
    assert [e["seq"] for e in reg.history("a", "stable", limit=2)] == [6, 5]
    assert reg.get_manifest(mids[1]) == b"signed 1"
    assert reg.manifest_info(mids[1]) == ("a", 7, "1.7", 101)
    assert reg.releases() == {
        mids[0]: ("a", 5, "1.5"),
        mids[1]: ("a", 7, "1.7"),
        mids[2]: ("b", 3, "1.3"),
        mids[4]: ("a", 2**62, f"1.{2**62}"),
    }
    reg.close()


@pytest.mark.parametrize("store", SHARED)
def test_another_replicas_change_moves_the_version(
    store: str, request: pytest.FixtureRequest
) -> None:
    url = str(registry_url_for(request, store))
    a, b = (shared_registry(store, url, "v:") for _ in range(2))
    v0 = b.data_version()
    a.add_app("a", b"k" * 32, b"t" * 32, 1.0)
    v1 = b.data_version()
    assert v1 != v0
    with pytest.raises(Conflict):  # a refusal changes nothing, so it does not wake anyone
        a.add_app("a", b"k" * 32, b"t" * 32, 1.0)
    assert b.data_version() == v1
    assert b.get_app("a") is not None  # cached now
    a.rotate_token("a", b"n" * 32)
    b.data_version()  # what the watcher does: the cached row goes
    row = b.get_app("a")
    assert row is not None and row.token_hash == b"n" * 32
    a.close()
    b.close()


async def test_registry_redis_down_is_503_and_nothing_half_applied(
    replicas: Callable[..., Tracker],
    own_redis: RedisProcess,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = replicas("a", own_redis.url)
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    b1, b2 = make_manifest(1), make_manifest(2)
    await c.publish(APP, "stable", b1.encode())
    own_redis.stop()
    http: httpx.AsyncClient = c._http
    for method, path, body in (
        ("POST", f"/v1/apps/{APP}/channels/stable/manifests", b2.encode()),
        ("GET", f"/v1/apps/{APP}/channels/stable", b""),
        ("GET", f"/v1/apps/{APP}/channels/stable/history", b""),
        ("GET", f"/v1/manifests/{b2.id.hex()}", b""),
        ("GET", "/healthz", b""),
    ):
        resp = await http.request(
            method, path, content=body, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert resp.status_code == 503, (path, resp.text)
        if path != "/healthz":
            err = resp.json()
            assert err["error"] == "registry_unavailable", err
            assert f"127.0.0.1:{own_redis.port}/0" in err["message"] and err["fix"]
    # what is cached (the app row, the published manifest) is still served
    assert (await http.get(f"/v1/manifests/{b1.id.hex()}")).content == b1.encode()

    own_redis.start()
    with trio.fail_after(5):  # the health probe closes the circuit breaker
        while (await http.get("/healthz")).status_code != 200:
            await trio.sleep(0.05)
    head = await c.latest(APP, "stable")
    assert head is not None and head.manifest_id == b1.id
    assert len(await c.history(APP, "stable")) == 1
    assert (await c.publish(APP, "stable", b2.encode()))["seq"] == head.seq + 1
    await http.aclose()


def test_unreachable_registry_fails_fast(tmp_path: Path) -> None:
    reg = RedisRegistry(f"redis://127.0.0.1:{free_port()}/0")
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        reg.head("a", "stable")
    with pytest.raises(RegistryUnavailable, match="within the last"):  # the breaker is open
        reg.get_app("a")
    assert time.monotonic() - t0 < 2
    reg.close()


@pytest.mark.parametrize("store", SHARED)
def test_cli_serve_with_registry(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, publisher: Any
) -> None:
    """Two `tracker serve` processes, separate --data, one --registry: an app added through
    one with `tracker app add` is listed by the other; an unreachable --registry is refused."""
    url = str(registry_url_for(request, store))
    key = keys.format_public_key(keys.public_key_bytes(publisher))
    one = LocalTracker(tmp_path / "one", ADMIN, "--registry", url)
    two = LocalTracker(tmp_path / "two", ADMIN, "--registry", url)
    try:
        url_one, url_two = one.start(), two.start()
    except P2PNodeError as exc:
        pytest.fail(str(exc))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tracker", "app", "add", APP, "--key", key, "--url", url_one,
             "--admin-token", ADMIN, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        apps = httpx.get(url_two + "/v1/apps", timeout=10).json()["apps"]
        assert apps == [{"app": APP, "key": key}]
    finally:
        assert one.stop() == 0 and two.stop() == 0
    bad = subprocess.run(
        [sys.executable, "-m", "tracker", "serve", "--listen", "127.0.0.1:0", "--data",
         str(tmp_path / "three"), "--admin-token", ADMIN, "--registry",
         url.replace(f":{urlsplit(url).port}/", f":{free_port()}/")],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert bad.returncode != 0 and "cannot reach the registry" in bad.stderr
    assert "--registry" in bad.stderr


async def test_announces_make_no_registry_round_trip_once_warm(
    replicas: Callable[..., Tracker],
    own_redis: RedisProcess,
    publisher: Any,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """The registry has its own Redis here: counting the commands it served shows that
    announces, publisher-token checks and manifest downloads are answered from memory."""
    t = replicas("a", own_redis.url)
    c = client_for(t)
    reg = await c.add_app(APP, keys.public_key_bytes(publisher))
    b1 = make_manifest(1)
    await c.publish(APP, "stable", b1.encode())
    node = keys.generate_key()
    await c.announce(node, app=APP, manifest_id=b1.id, port=7000, numwant=5)  # warms the cache

    def served() -> dict[str, int]:
        stats = t.registry._fast.info("commandstats")  # type: ignore[attr-defined]
        return {k: v["calls"] for k, v in stats.items()}

    before = served()
    for i in range(20):
        await c.announce(keys.generate_key(), app=APP, manifest_id=b1.id, port=7001 + i)
    assert await c.fetch_manifest(b1.id) == b1.encode()
    pc = client_for(t, token=str(reg["publisher_token"]))
    with pytest.raises(TrackerRefusedError):  # the token check is served from memory too
        await pc.publish(APP, "stable", b1.encode())
    # Redis saw only the refused publish's script (commandstats counts the commands a script
    # runs: it read the app and max_build and wrote nothing) and this INFO
    after = served()
    assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k)} == {
        "cmdstat_evalsha": 1,
        "cmdstat_hexists": 1,
        "cmdstat_hget": 1,
        "cmdstat_info": 1,
    }
    await c._http.aclose()
    await pc._http.aclose()


def test_copy_a_sqlite_registry_into_redis(tmp_path: Path, redis_url: str) -> None:
    """`tracker registry copy` moves everything, seq included, so nodes following a channel
    with since=SEQ go on; a second copy into the now non-empty registry is refused."""
    (tmp_path / "d").mkdir()
    old = SQLiteRegistry(tmp_path / "d" / "registry.db")
    old.add_app("a", b"k" * 32, b"t" * 32, 10.0)
    old.add_app("b", b"K" * 32, b"T" * 32, 11.0)
    mids = [bytes([n]) * 32 for n in range(4)]
    for n, (app, ch, build) in enumerate([("a", "stable", 5), ("a", "stable", 9), ("b", "x", 1)]):
        old.publish(Publication(app, ch, mids[n], build, f"v{build}", n, b"s%d" % n, 100.0 + n,
                                "admin"))  # fmt: skip
    old.move(app="a", channel="beta", manifest_id=mids[1], action="promote", now=104.0,
             actor="publisher")  # fmt: skip
    old.move(app="a", channel="stable", manifest_id=mids[0], action="rollback", now=105.0,
             actor="admin")  # fmt: skip
    assert old.add_rotation("a", b"k" * 32, b"a signed rotation", 106.0)  # kept as bytes
    cmd = [sys.executable, "-m", "tracker", "registry", "copy", "--data", str(tmp_path / "d"),
           "--registry", redis_url, "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "apps": 2, "manifests": 3, "moves": 5, "channels": 3, "rotations": 1}  # fmt: skip

    new = RedisRegistry(redis_url)
    assert new.list_apps() == old.list_apps()
    for app in ("a", "b"):
        assert new.channels(app) == old.channels(app)
        for h in old.channels(app):
            assert new.history(app, h.channel) == old.history(app, h.channel)
            assert new.previous_head(app, h.channel) == old.previous_head(app, h.channel)
    assert new.releases() == old.releases()
    assert new.rotations("a") == old.rotations("a") == [b"a signed rotation"]
    assert new.rotations("b") == []
    for mid in mids:
        assert new.get_manifest(mid) == old.get_manifest(mid)
        assert new.manifest_info(mid) == old.manifest_info(mid)
    with pytest.raises(Conflict):  # max_build came along: 9 was published before the rollback
        new.publish(Publication("a", "stable", mids[3], 9, "v9", 1, b"s", 106.0, "admin"))
    seq = new.publish(Publication("a", "stable", mids[3], 10, "v10", 1, b"s", 106.0, "admin"))
    assert seq == 6

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "is not empty" in again.stderr
    assert new.head("a", "stable").seq == 6  # type: ignore[union-attr]
    new.close()
    old.close()
