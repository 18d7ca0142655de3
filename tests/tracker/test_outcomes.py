"""Install outcomes: signed, checked, rate-limited, tallied per build in the API and /metrics."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.tracker import TrackerClient, TrackerRefusedError
from p2pnode.discovery.tracker_api import (
    ANNOUNCE_DOMAIN,
    OUTCOME_DOMAIN,
    SIGNATURE_HEADER,
    sign_body,
)
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import APP, STORES, client_for, registry_url_for
from tracker import Tracker
from tracker.backend import OpsStore
from tracker.ops_pg import PGOps
from tracker.ops_redis import RedisOps
from tracker.ops_sqlite import SQLiteOps
from tracker.outcomes import MAX_RELEASES, SERIES_HOURS, SERIES_STEP, Outcome
from tracker.pg import PGDatabase
from tracker.registry_redis import RedisRegistry


def fields(m: M.SignedManifest, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "app": APP,
        "manifest": m.id.hex(),
        "to_build": m.manifest.build,
        "kind": "update",
        "outcome": "success",
        "duration_ms": 1500,
        "from_build": 1,
        "bytes_peers": 700,
        "bytes_cdn": 300,
        "bytes_reused": 9000,
    }
    out.update(kw)
    return {k: v for k, v in out.items() if v is not None}


async def test_outcomes_are_tallied_per_build_with_their_failure_codes(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    one, two = make_manifest(1), make_manifest(2)
    for m in (one, two):
        await client.publish(APP, "stable", m.encode())
    nodes = [keys.generate_key() for _ in range(5)]
    for k in nodes[:3]:
        await client.report_outcome(k, fields(two))
    await client.report_outcome(nodes[3], fields(two, outcome="failure", code="download_failed"))
    await client.report_outcome(
        nodes[4], fields(two, outcome="failure", code="insufficient_storage", bytes_peers=None)
    )
    await client.report_outcome(nodes[4], fields(one, kind="rollback", from_build=2))
    got = (await client._http.get("/v1/outcomes")).json()["releases"]
    by_build = {r["build"]: r for r in got}
    b2 = by_build[2]
    assert (b2["reports"], b2["success"], b2["failure"]) == (5, 3, 2)
    assert b2["success_rate"] == pytest.approx(0.6) and b2["version"] == "1.2"
    assert b2["failure_codes"] == {"download_failed": 1, "insufficient_storage": 1}
    assert b2["by_kind"] == {"update": {"success": 3, "failure": 2}}
    assert b2["bytes"] == {"peers": 2800, "cdn": 1500, "reused": 45000, "patches": 0,
                           "patches_cdn": 0, "patches_peers": 0}  # fmt: skip
    assert b2["mean_success_s"] == pytest.approx(1.5)
    assert by_build[1]["by_kind"] == {"rollback": {"success": 1, "failure": 0}}
    only = (await client._http.get("/v1/outcomes", params={"app": "other"})).json()
    assert only == {"releases": []}
    text = (await client._http.get("/metrics")).text
    label = f'app="{APP}",kind="update",manifest="{two.id.hex()}",outcome="failure",version="1.2"'
    assert f"tracker_install_outcomes_total{{{label}}} 2.0" in text
    label = f'app="{APP}",code="download_failed",manifest="{two.id.hex()}",version="1.2"'
    assert f"tracker_install_failures_total{{{label}}} 1.0" in text


async def test_patch_bytes_are_split_by_source_in_the_tally_metrics_and_series(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    """A node says how many of its CDN and peer bytes were delta patches; an older node's
    patches (no split) count in ``patches`` only; parts that do not fit are refused."""
    m = make_manifest(1)
    await client.publish(APP, "stable", m.encode())
    await client.announce(keys.generate_key(), app=APP, manifest_id=m.id, port=0, numwant=0)
    assert client._outcome_fields == {"bytes_patches_cdn", "bytes_patches_peers"}
    split = {"bytes_patches": 250, "bytes_patches_cdn": 200, "bytes_patches_peers": 50}
    await client.report_outcome(keys.generate_key(), fields(m, **split))
    await client.report_outcome(keys.generate_key(), fields(m, bytes_patches=100))  # older node
    for bad in (
        {"bytes_patches": 10, "bytes_patches_cdn": 8, "bytes_patches_peers": 5},  # 13 > 10
        {"bytes_patches": 400, "bytes_patches_cdn": 301},  # more than bytes_cdn
        {"bytes_patches": 800, "bytes_patches_peers": 701},  # more than bytes_peers
    ):
        with pytest.raises(TrackerRefusedError) as err:
            await client.report_outcome(keys.generate_key(), fields(m, **bad))
        assert err.value.status == 400 and "bytes_patches_cdn" in str(err.value)
    [rel] = (await client._http.get("/v1/outcomes")).json()["releases"]
    assert rel["bytes"] == {"peers": 1400, "cdn": 600, "reused": 18000, "patches": 350,
                            "patches_cdn": 200, "patches_peers": 50}  # fmt: skip
    text = (await client._http.get("/metrics")).text
    label = f'app="{APP}",manifest="{m.id.hex()}",source="patches_cdn",version="1.1"'
    assert f"tracker_install_outcome_bytes_total{{{label}}} 200.0" in text
    traffic = (await client._http.get(f"/v1/apps/{APP}/builds/1/traffic")).json()
    totals = traffic["totals"]
    assert (totals["patches"], totals["patches_cdn"], totals["patches_peers"]) == (350, 200, 50)


async def test_bad_forged_replayed_and_too_frequent_outcomes_are_refused(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await client.publish(APP, "stable", m.encode())
    k = keys.generate_key()

    async def refused(f: dict[str, Any]) -> int:
        with pytest.raises(TrackerRefusedError) as err:
            await client.report_outcome(k, f)
        return err.value.status

    assert await refused(fields(m, outcome="failure")) == 400  # no code
    assert await refused(fields(m, outcome="failure", code="gremlins")) == 400
    assert await refused(fields(m, code="download_failed")) == 400  # a success has none
    assert await refused(fields(m, kind="reboot")) == 400
    assert await refused(fields(m, extra=1)) == 400
    assert await refused(fields(m, to_build=7)) == 404  # not that manifest's build
    # an announce's signature is not an outcome's
    body, sig = sign_body(k, ANNOUNCE_DOMAIN, fields(m))
    headers = {SIGNATURE_HEADER: sig, "Content-Type": "application/json"}
    resp = await client._http.post("/v1/outcomes", content=body, headers=headers)
    assert resp.status_code == 403
    # a replay is refused; so is a node that sends too many (the reports' rate)
    body, sig = sign_body(k, OUTCOME_DOMAIN, fields(m))
    headers[SIGNATURE_HEADER] = sig
    assert (
        await client._http.post("/v1/outcomes", content=body, headers=headers)
    ).status_code == 201
    assert (
        await client._http.post("/v1/outcomes", content=body, headers=headers)
    ).status_code == 409
    statuses = []
    for _ in range(8):
        try:
            await client.report_outcome(k, fields(m))
            statuses.append(201)
        except TrackerRefusedError as exc:
            statuses.append(exc.status)
    assert 429 in statuses
    [rel] = (await client._http.get("/v1/outcomes")).json()["releases"]
    assert rel["reports"] == statuses.count(201) + 1


@pytest.mark.parametrize("store", STORES)
def test_the_tally_is_bounded(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    ops = open_ops(store, tmp_path, request)
    n = MAX_RELEASES + 10
    for i in range(n):
        mid = i.to_bytes(32, "big")
        o = Outcome(b"n" * 20, APP, mid, "install", None, 1, None, i, (0, 0, 0, 0))
        assert ops.add_outcome(o, i.to_bytes(16, "big"), float(i), 600.0)
    builds = ops.outcome_stats(None)
    assert len(builds) == MAX_RELEASES and builds[0]["build"] == n - 1
    assert min(b["build"] for b in builds) == 10  # the least recently reported went
    # a digest seen within the window is a replay; after it, it is not (Redis expires the
    # digest on its own clock)
    o = Outcome(b"n" * 20, APP, b"x" * 32, "install", None, 1, None, 1, (0, 0, 0, 0))
    assert not ops.add_outcome(o, (n - 1).to_bytes(16, "big"), float(n), 600.0)
    if store != "redis":
        assert ops.add_outcome(o, (n - 1).to_bytes(16, "big"), float(n) + 601, 600.0)
    ops.close()


def open_ops(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> OpsStore:
    """An operations store of that kind (a fresh redis-server or PostgreSQL database)."""
    url = registry_url_for(request, store)
    if url is None:
        return SQLiteOps(tmp_path / "ops.db")
    if store == "postgres":
        db = PGDatabase(url)
        request.addfinalizer(db.close)
        return PGOps(db)
    reg = RedisRegistry(url)
    request.addfinalizer(reg.close)
    return RedisOps(reg)


@pytest.mark.parametrize("store", STORES)
async def test_replicas_share_the_tally_and_a_restart_keeps_it(
    store: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
    request: pytest.FixtureRequest,
) -> None:
    url = registry_url_for(request, store)
    one = make_tracker("one", registry_url=url)
    two = make_tracker("one" if url is None else "two", registry_url=url)  # same DIR / Redis
    a, b = client_for(one), client_for(two)
    await a.add_app(APP, keys.public_key_bytes(publisher))
    m = make_manifest(1)
    await a.publish(APP, "stable", m.encode())
    k = keys.generate_key()
    body, sig = sign_body(k, OUTCOME_DOMAIN, fields(m))
    await a.report_outcome(k, fields(m, outcome="failure", code="download_failed"))
    await b.report_outcome(keys.generate_key(), fields(m, kind="rollback", from_build=2))
    headers = {SIGNATURE_HEADER: sig, "Content-Type": "application/json"}
    # the same outcome sent to both replicas counts once
    statuses = [
        (await c._http.post("/v1/outcomes", content=body, headers=headers)).status_code
        for c in (a, b)
    ]
    assert statuses == [201, 409]
    three = make_tracker("one" if url is None else "three", registry_url=url)  # a restart
    for t in (one, two, three):
        [rel] = (await client_for(t)._http.get("/v1/outcomes")).json()["releases"]
        assert (rel["success"], rel["failure"], rel["rollbacks_to"]) == (2, 1, 1)
        assert rel["rollbacks_from"] == 0  # build 2 was never published here
        assert rel["failure_codes"] == {"download_failed": 1}
    for c in (a, b):
        await c._http.aclose()


@pytest.mark.parametrize("store", STORES)
def test_a_rollout_node_set_keeps_each_nodes_latest_outcome_and_is_bounded(
    store: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = open_ops(store, tmp_path, request)
    monkeypatch.setattr(type(ops).__module__ + ".MAX_NODES", 3)
    key, other = "app/stable/ab/0", "app/stable/ab/1"
    assert ops.rollout_node(key, APP, "stable", b"a" * 20, True) == "new"
    assert ops.rollout_node(key, APP, "stable", b"a" * 20, True) == "failed"
    assert ops.rollout_node(key, APP, "stable", b"a" * 20, False) == "failed"
    assert ops.rollout_node(key, APP, "stable", b"a" * 20, False) == "ok"
    assert ops.rollout_node(key, APP, "stable", b"b" * 20, False) == "new"
    assert ops.rollout_node(key, APP, "stable", b"c" * 20, False) == "new"
    assert ops.rollout_node(key, APP, "stable", b"d" * 20, True) == "full"
    assert ops.rollout_node(key, APP, "stable", b"c" * 20, True) == "ok"  # known: noted
    assert ops.rollout_node(other, APP, "stable", b"a" * 20, True) == "new"
    ops.drop_rollout_nodes(APP, "stable", other)  # the first set goes, the kept one stays
    assert ops.rollout_node(key, APP, "stable", b"a" * 20, True) == "new"
    assert ops.rollout_node(other, APP, "stable", b"a" * 20, True) == "failed"
    ops.drop_rollout_nodes(APP, "stable", None)
    assert ops.rollout_node(other, APP, "stable", b"a" * 20, True) == "new"
    ops.close()


@pytest.mark.parametrize("store", STORES)
async def test_a_rollback_counts_against_the_build_it_fled(
    store: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
    request: pytest.FixtureRequest,
) -> None:
    c = client_for(make_tracker(registry_url=registry_url_for(request, store)))
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    for m in (one, two):
        await c.publish(APP, "stable", m.encode())
    for _ in range(2):
        await c.report_outcome(keys.generate_key(), fields(one, kind="rollback", from_build=2))
    await c.report_outcome(  # a failed rollback still says the node tried to flee build 2
        keys.generate_key(),
        fields(one, kind="rollback", from_build=2, outcome="failure", code="rollback_failed"),
    )
    tally = {r["build"]: r for r in (await c._http.get("/v1/outcomes")).json()["releases"]}
    assert (tally[2]["rollbacks_from"], tally[2]["rollbacks_to"], tally[2]["reports"]) == (3, 0, 0)
    assert (tally[1]["rollbacks_from"], tally[1]["rollbacks_to"]) == (0, 3)
    metrics = (await c._http.get("/metrics")).text
    label = (
        f'app="{APP}",direction="from",manifest="{two.id.hex()}",version="{two.manifest.version}"'
    )
    assert f"tracker_install_rollbacks_total{{{label}}} 3.0" in metrics, metrics
    await c._http.aclose()


@pytest.mark.parametrize("store", STORES)
async def test_each_builds_outcomes_over_time_in_hours(
    store: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
    request: pytest.FixtureRequest,
) -> None:
    """Successes, failures by code and rollbacks from a build, per hour; the hours older than
    SERIES_HOURS go."""
    clock = [time.time()]  # a fixed clock, moved by hand
    h0 = int(clock[0] // SERIES_STEP)
    t = make_tracker(registry_url=registry_url_for(request, store), clock=lambda: clock[0])
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    for m in (one, two):
        await c.publish(APP, "stable", m.encode())

    async def report(**kw: Any) -> None:
        k = keys.generate_key()
        obj = {**fields(two), **kw, "key": keys.format_public_key(keys.public_key_bytes(k))}
        obj.update(ts=int(clock[0]), nonce=os.urandom(12).hex())
        body = json.dumps(obj).encode()
        sig = keys.sign(k, OUTCOME_DOMAIN, body).hex()
        headers = {SIGNATURE_HEADER: sig, "Content-Type": "application/json"}
        got = await c._http.post("/v1/outcomes", content=body, headers=headers)
        assert got.status_code == 201, got.text

    await report()
    await report(outcome="failure", code="download_failed")
    clock[0] += 2 * SERIES_STEP  # two hours later
    await report()
    await report(**fields(one, kind="rollback", from_build=2))

    async def series(hours: int) -> dict[int, list[dict[str, Any]]]:
        answer = await c._http.get("/v1/outcomes", params={"hours": hours})
        assert answer.status_code == 200, answer.text
        return {r["build"]: r["series"] for r in answer.json()["releases"]}

    got = await series(3)
    assert got[2] == [
        {"at": h0 * SERIES_STEP, "success": 1, "failure": 1,
         "failure_codes": {"download_failed": 1}, "rollbacks_from": 0},
        {"at": (h0 + 2) * SERIES_STEP, "success": 1, "failure": 0, "failure_codes": {},
         "rollbacks_from": 1},
    ], got  # fmt: skip
    assert [h["success"] for h in got[1]] == [1]  # the rollback succeeded, landing on 1
    assert [h["at"] for h in (await series(1))[2]] == [(h0 + 2) * SERIES_STEP]
    assert (await c._http.get("/v1/outcomes", params={"hours": 0})).status_code == 400
    # a week later the first hours are gone from the store
    clock[0] += SERIES_HOURS * SERIES_STEP
    await report()
    got = await series(SERIES_HOURS)
    assert [h["at"] for h in got[2]] == [(h0 + 2 + SERIES_HOURS) * SERIES_STEP]
    rows = t.ops.outcome_series(APP, 0)
    assert sorted({h for h, _, _ in rows[two.id]}) == [h0 + 2 + SERIES_HOURS], rows
    await c._http.aclose()


@pytest.mark.parametrize("store", STORES)
def test_replicas_noting_the_same_nodes_at_once_count_each_node_once(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Four writers (threads, as replicas' worker threads are) note the same 30 nodes at
    once: each node is "new" to exactly one of them."""
    ops = open_ops(store, tmp_path, request)
    nodes = [i.to_bytes(20, "big") for i in range(30)]
    seen: list[str] = []
    lock = threading.Lock()

    def writer() -> None:
        got = [ops.rollout_node("app/stable/ab/0", APP, "stable", n, False) for n in nodes]
        with lock:
            seen.extend(got)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen.count("new") == len(nodes) and seen.count("ok") == 3 * len(nodes), seen
    ops.close()
