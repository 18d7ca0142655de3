"""The operator's side end to end against the in-process tracker, on SQLite, Redis and
PostgreSQL: 200 simulated nodes (their own keys and node ids) ask the feed which build is
theirs, report outcomes, and a rollout halts itself; the audit log records who did what from
where; a rotated publisher token stops working everywhere."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.tracker import TrackerClient, TrackerRefusedError
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP, STORES, client_for, registry_url_for
from tracker import Tracker
from tracker.rollout import member

FLEET = 200


def outcome(m: M.SignedManifest, failed: bool) -> dict[str, Any]:
    f: dict[str, Any] = {
        "app": APP,
        "manifest": m.id.hex(),
        "to_build": m.manifest.build,
        "from_build": 1,
        "kind": "update",
        "outcome": "failure" if failed else "success",
        "duration_ms": 900,
    }
    if failed:
        f["code"] = "integrity_check_failed"
    return f


async def builds(
    c: TrackerClient, fleet: list[bytes], have: dict[bytes, bytes] | None = None
) -> dict[bytes, int]:
    """The build the feed offers each node."""
    out = {}
    for n in fleet:
        head = await c.latest(APP, "stable", node=n, have=(have or {}).get(n))
        assert head is not None
        out[n] = head.build
    return out


@pytest.fixture(params=STORES)
def store_tracker(request: pytest.FixtureRequest, make_tracker: Callable[..., Tracker]) -> Tracker:
    url = registry_url_for(request, request.param)
    # simulated nodes share one address here, and some retry: lift the per-address and
    # per-node limits
    return make_tracker(
        registry_url=url, client_rate=1e6, client_burst=1e6, report_rate=1e6, report_burst=1e6
    )


async def test_a_rollout_reaches_its_share_grows_without_flipping_and_halts_itself(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = store_tracker
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    await c.publish(APP, "stable", one.encode())
    answer = await c.publish(APP, "stable", two.encode(), rollout=10)
    assert answer["rollout"]["percent"] == 10 and answer["rollout"]["state"] == "active"
    node_keys = [keys.generate_key() for _ in range(FLEET)]
    key_of = {keys.node_id_of(keys.public_key_bytes(k)): k for k in node_keys}
    fleet = list(key_of)

    at10 = {n for n, b in (await builds(c, fleet)).items() if b == 2}
    assert at10 == {n for n in fleet if member(two.id, n, 10)}
    # about 10% of 200: Binomial(200, 0.1) leaves these bounds with p ~ 1.5e-5 (36 was seen once)
    assert 5 <= len(at10) <= 40, len(at10)
    head = await c.latest(APP, "stable")  # a client that does not say who it is: out
    assert head is not None and head.build == 1

    # a node out at 10% but in at 50%, long-polling, learns it is in when the rollout rises
    joiner = next(n for n in fleet if n not in at10 and member(two.id, n, 50))
    got: list[int] = []
    async with trio.open_nursery() as nursery:

        async def follow() -> None:
            h = await c.wait_for_release(APP, "stable", since=head.seq, node=joiner)
            got.append(h.build)

        nursery.start_soon(follow)
        await t.feed.until_waiting()
        raised = await c.change_rollout(APP, "stable", "raise", percent=50)
    assert raised["percent"] == 50 and got == [2]

    at50 = {n for n, b in (await builds(c, fleet)).items() if b == 2}
    assert at10 <= at50  # rising only adds nodes
    assert 65 <= len(at50) <= 135, len(at50)  # Binomial(200, 0.5): outside p ~ 4e-7
    with pytest.raises(TrackerRefusedError) as err:
        await c.change_rollout(APP, "stable", "raise", percent=20)  # never lower
    assert err.value.status == 409

    # the rollout's nodes install it; 5% of them fail, the rest succeed
    failing = set(sorted(at50)[: math.ceil(0.05 * len(at50))])
    runs = {n: one.id for n in fleet}
    for n in sorted(at50 - failing):
        await c.report_outcome(key_of[n], outcome(two, failed=False))
        runs[n] = two.id
    state = (await c._http.get(f"/v1/apps/{APP}/channels/stable/rollout")).json()
    assert state["state"] == "active"
    for n in sorted(failing):
        await c.report_outcome(key_of[n], outcome(two, failed=True))
    state = (await c._http.get(f"/v1/apps/{APP}/channels/stable/rollout")).json()
    assert state["state"] == "halted" and state["reason"].startswith("auto:"), state
    # it halts at the first failure that reaches 5% of the outcomes; later ones are not its own
    ok = len(at50 - failing)
    halted_at = next(f for f in range(1, len(failing) + 1) if f >= 0.05 * (ok + f))
    assert state["failure"] == halted_at and state["success"] == ok, state

    # no further node is offered build 2; the ones that run it keep it; the rest stay on 1
    after = await builds(c, fleet, have=runs)
    assert {n for n, b in after.items() if b == 2} == at50 - failing
    assert sum(1 for b in after.values() if b == 1) == FLEET - len(at50 - failing)

    # recorded: the channel's history, the audit log, /metrics, /v1/stats
    history = await c.history(APP, "stable")
    assert [h["action"] for h in history[:3]] == [
        "rollout-halt",
        "rollout-raise",
        "publish",
    ]
    assert history[0]["actor"] == "tracker"
    metrics = (await c._http.get("/metrics")).text
    label = f'app="{APP}",build="2",channel="stable"'
    assert f"tracker_rollout_halted{{{label}}} 1.0" in metrics
    assert f"tracker_rollout_percent{{{label}}} 50.0" in metrics
    stats = (await c._http.get("/v1/stats")).json()
    assert stats["rollouts"][0]["state"] == "halted"
    [b2] = [b for b in stats["outcomes"] if b["build"] == 2]
    assert b2["failure_codes"] == {"integrity_check_failed": len(failing)}

    # resuming is the operator's call; completing offers the build to everyone
    resumed = await c.change_rollout(APP, "stable", "resume")
    assert resumed["state"] == "active" and resumed["failure"] == 0
    await c.change_rollout(APP, "stable", "complete")
    assert set((await builds(c, fleet)).values()) == {2}
    await c._http.aclose()


async def test_the_automatic_halt_counts_nodes_not_attempts(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """One broken node retrying 30 times among 40 healthy ones is one failed node of 41
    (2.4% < 5%): no halt; a node that failed and then succeeded counts as succeeded; 3
    distinct failing nodes of 40 (7.5%) halt it."""
    c = client_for(store_tracker)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    await c.publish(APP, "stable", one.encode())
    await c.publish(APP, "stable", two.encode(), rollout=50)
    healthy = [keys.generate_key() for _ in range(40)]
    for k in healthy:
        await c.report_outcome(k, outcome(two, failed=False))
    broken = keys.generate_key()
    for _ in range(30):
        await c.report_outcome(broken, outcome(two, failed=True))

    async def state() -> dict[str, Any]:
        got: dict[str, Any] = (await c._http.get(f"/v1/apps/{APP}/channels/stable/rollout")).json()
        return got

    s = await state()
    assert (s["state"], s["success"], s["failure"]) == ("active", 40, 1), s
    await c.report_outcome(broken, outcome(two, failed=False))  # it recovered
    s = await state()
    assert (s["state"], s["success"], s["failure"]) == ("active", 41, 0), s
    for k in healthy[:2]:  # two nodes that had succeeded now fail: 2 of 41
        await c.report_outcome(k, outcome(two, failed=True))
    assert (await state())["state"] == "active"
    await c.report_outcome(healthy[2], outcome(two, failed=True))  # 3 of 41 = 7.3%
    s = await state()
    assert (s["state"], s["success"], s["failure"]) == ("halted", 38, 3), s
    assert s["reason"].startswith("auto: 3 of 41 nodes failed"), s
    # resuming counts afresh: a node's earlier outcome is not remembered
    await c.change_rollout(APP, "stable", "resume")
    await c.report_outcome(healthy[0], outcome(two, failed=False))
    s = await state()
    assert (s["state"], s["success"], s["failure"], s["epoch"]) == ("active", 1, 0, 1), s
    await c._http.aclose()


async def test_the_audit_log_records_changes_and_refused_tokens_with_actor_and_address(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = store_tracker
    admin = client_for(t, ip="192.0.2.10")
    token = str((await admin.add_app(APP, keys.public_key_bytes(publisher)))["publisher_token"])
    pub = client_for(t, token=token, ip="192.0.2.20")
    one = make_manifest(1)  # once: each call stamps the time, so a second call may differ
    await pub.publish(APP, "stable", one.encode())
    intruder = client_for(t, token="not-a-token-at-all", ip="203.0.113.7")
    with pytest.raises(TrackerRefusedError):
        await intruder.publish(APP, "stable", make_manifest(2).encode())
    assert (await intruder._http.get("/v1/audit")).status_code == 401
    await admin.rollback(APP, "stable", one.id)

    resp = await admin._http.get("/v1/audit", headers={"Authorization": "Bearer " + ADMIN})
    entries = resp.json()["entries"]
    assert [e["action"] for e in entries] == [
        "rollback",
        "auth-refused",
        "auth-refused",
        "publish",
        "app-registered",
    ]
    rollback, refused_audit, refused_publish, publish, registered = entries
    assert rollback["detail"]["manifest_id"] == publish["detail"]["manifest_id"]
    assert (registered["actor"], registered["token_id"], registered["address"]) == (
        "admin",
        "admin",
        "192.0.2.10",
    )
    assert publish["actor"] == "publisher" and publish["address"] == "192.0.2.20"
    assert publish["token_id"].startswith("t-") and token not in str(entries)
    assert publish["target"] == f"{APP}/stable" and publish["detail"]["build"] == 1
    assert refused_publish["address"] == "203.0.113.7"
    assert refused_publish["token_id"] not in ("", "admin", publish["token_id"])
    assert refused_audit["target"] == "/v1/audit"
    assert "not-a-token-at-all" not in str(entries)

    # paged, newest first
    auth = {"Authorization": "Bearer " + ADMIN}
    first = (await admin._http.get("/v1/audit", params={"limit": 2}, headers=auth)).json()
    assert [e["seq"] for e in first["entries"]] == [e["seq"] for e in entries[:2]]
    rest = (
        await admin._http.get(
            "/v1/audit", params={"limit": 10, "before": first["next_before"]}, headers=auth
        )
    ).json()
    assert [e["seq"] for e in rest["entries"]] == [e["seq"] for e in entries[2:]]
    assert rest["next_before"] is None
    for c in (admin, pub, intruder):
        await c._http.aclose()


async def test_the_audit_log_records_a_promote_and_a_cleared_peer(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    """The changes the test above does not make: a promote (publisher) and a peer cleared
    (admin), each with its actor, token id, address and target."""
    t = store_tracker
    admin = client_for(t, ip="192.0.2.10")
    token = str((await admin.add_app(APP, keys.public_key_bytes(publisher)))["publisher_token"])
    pub = client_for(t, token=token, ip="192.0.2.20")
    one = make_manifest(1)
    await pub.publish(APP, "stable", one.encode())
    await pub.promote(APP, "beta", one.id)
    peer = "ab" * 20
    auth = {"Authorization": "Bearer " + ADMIN}
    assert (await admin._http.delete(f"/v1/peers/{peer}", headers=auth)).status_code == 200
    entries = (await admin._http.get("/v1/audit", headers=auth)).json()["entries"]
    cleared, promote = entries[0], entries[1]
    assert (cleared["action"], cleared["actor"], cleared["token_id"]) == (
        "peer-cleared",
        "admin",
        "admin",
    )
    assert cleared["target"] == peer and cleared["address"] == "192.0.2.10"
    assert (promote["action"], promote["actor"], promote["address"]) == (
        "promote",
        "publisher",
        "192.0.2.20",
    )
    assert promote["target"] == f"{APP}/beta" and promote["token_id"].startswith("t-")
    assert promote["detail"]["manifest_id"] == one.id.hex()
    for c in (admin, pub):
        await c._http.aclose()


async def test_a_new_build_ends_a_rollout_and_a_staged_one_keeps_the_fleets_base(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    t = store_tracker
    c = client_for(t)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two, three, four = (make_manifest(b) for b in (1, 2, 3, 4))
    await c.publish(APP, "stable", one.encode())
    await c.publish(APP, "stable", two.encode(), rollout=10)
    # build 3 staged while build 2 is at 10%: the nodes out of it keep build 1, not 2
    staged = await c.publish(APP, "stable", three.encode(), rollout=10)
    assert staged["rollout"]["previous"] == one.id.hex()
    fleet = [keys.node_id_of(keys.public_key_bytes(keys.generate_key())) for _ in range(50)]
    assert set((await builds(c, fleet)).values()) <= {1, 3}
    # a plain publish ends it: everyone is offered build 4, and build 3's failures no longer
    # count (a halt must not move the channel back to build 3)
    await c.publish(APP, "stable", four.encode())
    assert set((await builds(c, fleet)).values()) == {4}
    for _ in range(25):
        await c.report_outcome(keys.generate_key(), outcome(three, failed=True))
    head = await c.latest(APP, "stable")
    assert head is not None and head.build == 4
    assert (await c._http.get(f"/v1/apps/{APP}/channels/stable/rollout")).status_code == 404
    stats = (await c._http.get("/v1/stats")).json()
    assert [r["state"] for r in stats["rollouts"]] == ["ended"]
    assert "tracker_rollout_percent{" not in (await c._http.get("/metrics")).text
    await c._http.aclose()


async def test_a_rotated_publisher_token_stops_working_on_every_replica(
    request: pytest.FixtureRequest,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    for store in STORES:
        url = registry_url_for(request, store)
        one = make_tracker(f"{store}-one", registry_url=url)
        two = make_tracker(f"{store}-one" if url is None else f"{store}-two", registry_url=url)
        admin = client_for(one)
        old = str((await admin.add_app(APP, keys.public_key_bytes(publisher)))["publisher_token"])
        on_one, on_two = client_for(one, token=old), client_for(two, token=old)
        await on_one.publish(APP, "stable", make_manifest(1).encode())
        await on_two.publish(APP, "stable", make_manifest(2).encode())  # its cache is warm
        new = await on_one.rotate_token(APP)  # the publisher rotates its own token
        await trio.to_thread.run_sync(two.registry.data_version)  # what its watcher does
        for c in (on_one, on_two):
            with pytest.raises(TrackerRefusedError) as err:
                await c.publish(APP, "stable", make_manifest(3).encode())
            assert err.value.status == 401 and "rotate-token" in (err.value.fix or "")
        for b, t in ((3, one), (4, two)):
            await client_for(t, token=new).publish(APP, "stable", make_manifest(b).encode())
        auth = {"Authorization": "Bearer " + ADMIN}
        entries = (await admin._http.get("/v1/audit", headers=auth)).json()["entries"]
        rotated = next(e for e in entries if e["action"] == "token-rotated")
        assert rotated["actor"] == "publisher" and rotated["target"] == APP
        assert rotated["token_id"] != rotated["detail"]["new_token_id"]
        assert [e["action"] for e in entries].count("auth-refused") == 2
        assert old not in str(entries) and new not in str(entries)
        for c in (admin, on_one, on_two):
            await c._http.aclose()


async def test_a_refused_staged_publish_leaves_the_channels_rollout_as_it_was(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    c = client_for(store_tracker)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    await c.publish(APP, "stable", make_manifest(1).encode())
    with pytest.raises(TrackerRefusedError) as err:  # nothing to keep the others on
        await c.publish(APP, "stable", make_manifest(2, channel="beta").encode(), rollout=5)
    assert err.value.status == 400
    await c.publish(APP, "stable", make_manifest(3).encode(), rollout=10)
    with pytest.raises(TrackerRefusedError) as err:  # not newer than build 3
        await c.publish(APP, "stable", make_manifest(2).encode(), rollout=50)
    assert err.value.status == 409
    r = (await c._http.get(f"/v1/apps/{APP}/channels/stable/rollout")).json()
    assert (r["build"], r["percent"], r["state"]) == (3, 10, "active")
    with pytest.raises(TrackerRefusedError) as err:
        await c.publish(APP, "beta", make_manifest(4, channel="beta").encode(), rollout=10)
    assert err.value.status == 409  # a first build cannot be staged
    await c._http.aclose()


async def test_a_node_out_of_the_rollout_gets_the_previous_builds_type_and_notes(
    store_tracker: Tracker,
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    from p2pnode.release.metadata import ReleaseInfo, UpdateType

    c = client_for(store_tracker)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one = make_manifest(1, info=ReleaseInfo(UpdateType.MINOR, "first"))
    two = make_manifest(2, info=ReleaseInfo(UpdateType.CRITICAL, "second"))
    await c.publish(APP, "stable", one.encode())
    await c.publish(APP, "stable", two.encode(), rollout=50)
    nodes = [keys.node_id_of(keys.public_key_bytes(keys.generate_key())) for _ in range(40)]
    inside = next(n for n in nodes if member(two.id, n, 50))
    outside = next(n for n in nodes if not member(two.id, n, 50))
    for node, (build, kind, notes) in ((inside, (2, "critical", "second")),
                                       (outside, (1, "minor", "first"))):  # fmt: skip
        got = (
            await c._http.get(f"/v1/apps/{APP}/channels/stable", params={"node": node.hex()})
        ).json()
        assert (got["build"], got["update_type"], got["notes"]) == (build, kind, notes)
        assert got["rollout"]["member"] is (build == 2)
    await c._http.aclose()


async def test_registry_copy_brings_outcomes_rollouts_and_the_audit_log_to_redis(
    tmp_path: Path,
    redis_url: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    old = make_tracker("old")
    c = client_for(old)
    await c.add_app(APP, keys.public_key_bytes(publisher))
    one, two = make_manifest(1), make_manifest(2)
    await c.publish(APP, "stable", one.encode())
    await c.publish(APP, "stable", two.encode(), rollout=10)
    await c.report_outcome(keys.generate_key(), outcome(two, failed=True))
    await client_for(old, token="wrong-token-here")._http.post("/v1/apps", json={})
    before = {
        path: (await c._http.get(path, headers={"Authorization": "Bearer " + ADMIN})).json()
        for path in ("/v1/outcomes", "/v1/audit", f"/v1/apps/{APP}/channels/stable/rollout")
    }
    cmd = [sys.executable, "-m", "tracker", "registry", "copy", "--data", str(tmp_path / "old"),
           "--registry", redis_url, "--json"]  # fmt: skip
    out = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    )
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert (counts["outcome_builds"], counts["rollouts"], counts["audit"]) == (1, 1, 4)
    new = make_tracker("new", registry_url=redis_url)
    n = client_for(new)
    for path, want in before.items():
        got = (await n._http.get(path, headers={"Authorization": "Bearer " + ADMIN})).json()
        assert got == want, path
    await n.change_rollout(APP, "stable", "raise", percent=20)  # the audit goes on numbering
    entries = (await n._http.get("/v1/audit", headers={"Authorization": "Bearer " + ADMIN})).json()
    assert entries["entries"][0]["seq"] == 5
    again = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    )
    assert again.returncode != 0 and "not empty" in again.stderr
    for x in (c, n):
        await x._http.aclose()
