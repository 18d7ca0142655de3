"""What only the PostgreSQL stores have: the schema's migrations, `tracker registry copy` into
PostgreSQL, and recovering from lost connections. (The flows they share with SQLite and Redis
run on all three in test_registry_redis.py, test_operations.py and test_outcomes.py.)"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release import rotation as R
from tests.support.tracker import ADMIN, APP, client_for, free_port
from tests.tracker.test_operations import outcome
from tracker import Tracker
from tracker.errors import RegistryUnavailable
from tracker.ops_pg import PGOps
from tracker.outcomes import Outcome
from tracker.pg import MIGRATIONS, PGDatabase, migrate
from tracker.registry_pg import PGRegistry
from tracker.rollout import Rollout

AUTH = {"Authorization": "Bearer " + ADMIN}


def test_replicas_starting_together_create_the_schema_once(pg_url: str) -> None:
    """Eight connections migrate at once: one applies the steps, the others find them done;
    a schema newer than this tracker's is refused with the fix."""
    results: list[Any] = []

    def run() -> None:
        try:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                results.append(migrate(conn))
        except BaseException as exc:  # reported by the main thread
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [len(MIGRATIONS)] * 8
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM tracker_schema").fetchall() == [(len(MIGRATIONS),)]
        conn.execute("UPDATE tracker_schema SET version = version + 1")
    reg = PGRegistry(PGDatabase(pg_url))
    with pytest.raises(RegistryUnavailable, match="upgrade the tracker"):
        reg.data_version()
    reg.close()


def test_replicas_counting_at_once_lose_nothing_and_count_a_replay_once(pg_url: str) -> None:
    """Eight threads on two replicas' stores report outcomes of one build and count them into
    its rollout at once: every outcome is in the tally and the rollout, the one digest they
    all send counts once, and no transaction deadlocks or fails."""
    stores = [PGOps(PGDatabase(pg_url)) for _ in range(2)]
    mid = b"m" * 32
    stores[0].put_rollout(Rollout(APP, "stable", mid, 2, b"p" * 32, 50.0))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        ops = stores[i % 2]
        try:
            for j in range(21):
                code = "download_failed" if j % 3 == 0 else None
                o = Outcome(b"n" * 20, APP, mid, "update", code, 10, 1, 2, (100, j, 0, 0))
                digest = b"same" if j == 20 else bytes([i, j])
                if ops.add_outcome(o, digest, 1000.0 + j, 600.0):
                    ops.update_rollout(APP, "stable", lambda r: replace(r, success=r.success + 1))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    [tally] = stores[1].outcome_stats(APP)
    assert tally["success"] + tally["failure"] == 8 * 20 + 1
    assert tally["failure"] == 8 * 7 + (1 if 20 % 3 == 0 else 0)
    r = stores[1].rollout(APP, "stable")
    assert r is not None and r.success == 8 * 20 + 1
    for ops in stores:
        ops.db.close()


def test_lost_connections_are_503_then_recover(pg_url: str, pg_cluster: Any) -> None:
    """The server drops every connection (a restart, a failover): the next call is 503
    naming the server, calls fail fast while the breaker is open, and the watcher's probe
    reconnects."""
    reg = PGRegistry(PGDatabase(pg_url))
    reg.add_app("a", b"k" * 32, b"t" * 32, 1.0)
    db = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
        )
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{pg_cluster.port}/{db}"):
        reg.list_apps()
    with pytest.raises(RegistryUnavailable, match="within the last"):
        reg.list_apps()
    assert reg.data_version() >= 1  # the probe gets through on a new connection
    assert [a.name for a in reg.list_apps()] == ["a"]
    reg.close()


async def test_a_tracker_whose_database_dropped_it_answers_503_then_recovers(
    pg_url: str,
    pg_cluster: Any,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = make_tracker(registry_url=pg_url)
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one = make_manifest(1)
    await c.publish(APP, "stable", one.encode())
    db = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
        )
    resp = await c._http.get(f"/v1/apps/{APP}/channels/stable/history")
    assert resp.status_code == 503 and resp.json()["error"] == "registry_unavailable"
    assert f"127.0.0.1:{pg_cluster.port}/{db}" in resp.json()["message"]
    # what is cached is still served; the health probe reconnects
    assert (await c._http.get(f"/v1/manifests/{one.id.hex()}")).content == one.encode()
    with trio.fail_after(5):
        while (await c._http.get("/healthz")).status_code != 200:
            await trio.sleep(0.05)
    head = await c.latest(APP, "stable")
    assert head is not None and head.manifest_id == one.id
    await c._http.aclose()


def test_an_unreachable_database_fails_fast() -> None:
    reg = PGRegistry(PGDatabase(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        reg.head("a", "stable")
    with pytest.raises(RegistryUnavailable, match="within the last"):
        reg.get_app("a")
    reg.close()


async def made_at(c: TrackerClient, path: str) -> list[dict[str, Any]]:
    """The forecasts of a build's events (without what followed: that moves with the clock)."""
    return [e["forecast"] for e in (await c._http.get(path)).json()["events"]]


async def test_registry_copy_moves_a_sqlite_tracker_into_postgres(
    tmp_path: Path,
    pg_url: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """`tracker registry copy --from DIR --to postgresql://` brings apps, manifests, every
    move, seq, key rotations, outcomes, rollouts, the audit log and the traffic series
    (forecasts); the new tracker answers as the old one did and goes on numbering; a second
    copy is refused and changes nothing."""
    old = make_tracker("old")
    c = client_for(old)
    reg = await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two, three = make_manifest(1), make_manifest(2), make_manifest(3)
    await c.publish(APP, "stable", one.encode())
    await c.publish(APP, "stable", three.encode())
    await c.rollback(APP, "stable")
    await c.promote(APP, "beta", three.id)
    k1 = keys.generate_key()
    rotation = R.Rotation(APP, keys.public_key_bytes(publisher), keys.public_key_bytes(k1),
                          int(time.time()) + 86400, 0)  # fmt: skip
    await c.rotate_key(APP, R.sign_rotation(rotation, publisher).encode())
    four = make_manifest(4)  # once: two calls a second apart sign different manifests
    await c.publish(APP, "stable", four.encode(), rollout=10)
    await c.report_outcome(keys.generate_key(), outcome(four, failed=True))
    await client_for(old, token="wrong-token-here")._http.post("/v1/apps", json={})
    channel = f"/v1/apps/{APP}/channels"
    paths = ["/v1/apps", "/v1/outcomes", "/v1/audit", f"/v1/apps/{APP}", f"{channel}/beta",
             f"{channel}/stable/rollout", f"{channel}/stable/history",
             f"/v1/manifests/{one.id.hex()}", f"/v1/apps/{APP}/rotations"]  # fmt: skip
    before = {p: (await c._http.get(p, headers=AUTH)).content for p in paths}
    await old.load.tick(time.time(), force=True)  # the traffic series is written to traffic.db
    forecasts = [f"/v1/apps/{APP}/builds/{b}/forecast" for b in (1, 3, 4)]
    made = [await made_at(c, p) for p in forecasts]  # build 3's: its publish and promote

    cmd = [sys.executable, "-m", "tracker", "registry", "copy", "--from", str(tmp_path / "old"),
           "--to", pg_url, "--json"]  # fmt: skip
    out = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        '{"apps": 1, "manifests": 3, "moves": 5, "channels": 2, "rotations": 1, '
        '"outcome_builds": 1, "rollouts": 1, "audit": 8, "traffic_builds": 0, '
        '"traffic_minutes": 0, "forecasts": 4}'
    )
    new = make_tracker("new", registry_url=pg_url)
    n = client_for(new)
    for p in paths:
        assert (await n._http.get(p, headers=AUTH)).content == before[p], p
    assert [await made_at(n, p) for p in forecasts] == made
    assert isinstance(new.registry, PGRegistry)
    pub = client_for(new, token=str(reg["publisher_token"]))  # the token came along
    with pytest.raises(Exception, match="not newer"):  # max_build came along
        await pub.publish(APP, "stable", two.encode())
    assert (await pub.publish(APP, "stable", make_manifest(5).encode()))["seq"] == 6
    entries = (await n._http.get("/v1/audit", headers=AUTH)).json()["entries"]
    assert entries[0]["seq"] == 9 and entries[0]["action"] == "publish"
    # the rotation came along: the new key's builds are taken
    await pub.publish(APP, "stable", make_manifest(6, key=k1).encode())

    again = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    )
    assert again.returncode != 0 and "already holds a tracker's registry" in again.stderr
    head = await n.latest(APP, "stable")
    assert head is not None and head.seq == 7
    for x in (c, n, pub):
        await x._http.aclose()
