"""The tracker API in-process: publishing, channels, the feed, announces, reports, operators."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.dht.records import Topic, make_record
from p2pnode.discovery.tracker import (
    ANNOUNCE_DOMAIN,
    PeerQualityReport,
    TrackerClient,
    TrackerPeerSource,
    TrackerRefusedError,
)
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP, client_for, long_poll_woken
from tracker import Tracker


async def publish(client: TrackerClient, signed: M.SignedManifest, channel: str = "stable") -> Any:
    return await client.publish(APP, channel, signed.encode())


def counts(t: Tracker) -> tuple[int, int]:
    """(manifests, channel events) stored: refusals must leave both unchanged."""
    c = t.registry._conn
    return (
        c.execute("SELECT COUNT(*) FROM manifests").fetchone()[0],
        c.execute("SELECT COUNT(*) FROM channel_events").fetchone()[0],
    )


async def test_publish_latest_and_verbatim_manifest(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest], publisher: Any
) -> None:
    signed = make_manifest(1)
    res = await publish(client, signed)
    assert res["manifest_id"] == signed.id.hex() and res["build"] == 1
    head = await client.latest(APP, "stable")
    assert head is not None and head.manifest_id == signed.id and head.version == "1.1"
    raw = await client.fetch_manifest(signed.id)
    assert raw == signed.encode()
    assert M.verify(M.parse_signed(raw), {keys.public_key_bytes(publisher)}).build == 1
    assert await client.latest(APP, "beta") is None


async def test_forged_older_and_wrong_manifests_are_refused_and_store_nothing(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    await publish(client, make_manifest(5))
    before = counts(tracker)
    intruder = keys.generate_key()
    cases = [
        (make_manifest(6, key=intruder).encode(), 403, "forbidden"),  # key is not the app's
        (make_manifest(5).encode(), 409, "conflict"),  # not newer
        (make_manifest(4).encode(), 409, "conflict"),  # older
        (make_manifest(7, expires_in=-5).encode(), 403, "forbidden"),  # expired
        (make_manifest(8, channel="beta").encode(), 400, "bad_request"),  # other channel
        (b"d8:manifest3:abce", 400, "bad_request"),  # not a manifest
    ]
    # a valid signature over altered bytes
    good = make_manifest(9)
    forged = M.SignedManifest(good.manifest, good.raw.replace(b"1.9", b"6.6"), good.signature)
    cases.append((forged.encode(), 403, "forbidden"))
    for body, status, code in cases:
        with pytest.raises(TrackerRefusedError) as err:
            await client.publish(APP, "stable", body)
        assert (err.value.status, err.value.code) == (status, code), err.value
    assert counts(tracker) == before
    head = await client.latest(APP, "stable")
    assert head is not None and head.build == 5


async def test_publisher_token_and_auth(
    tracker: Tracker,
    registered: dict[str, Any],
    make_manifest: Callable[..., M.SignedManifest],
) -> None:
    pub = client_for(tracker, token=registered["publisher_token"])
    await pub.publish(APP, "stable", make_manifest(1).encode())
    for token in (None, "wrong-token", ""):
        c = client_for(tracker, token=token)
        with pytest.raises(TrackerRefusedError) as err:
            await c.publish(APP, "stable", make_manifest(2).encode())
        assert err.value.status == 401
    # a publisher token cannot register apps
    with pytest.raises(TrackerRefusedError) as err:
        await pub.add_app("other", keys.public_key_bytes(keys.generate_key()))
    assert err.value.status == 401


async def test_promote_rollback_history(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    b1, b2 = make_manifest(1, channel="beta"), make_manifest(2, channel="beta")
    await publish(client, b1, "beta")
    await publish(client, b2, "beta")
    head = await client.promote(APP, "stable", b2.id)
    assert head.manifest_id == b2.id and head.channel == "stable"
    back = await client.rollback(APP, "beta")
    assert back.manifest_id == b1.id and back.build == 1
    # a build number once published cannot come back with other contents
    with pytest.raises(TrackerRefusedError) as err:
        await publish(client, make_manifest(2, channel="beta"), "beta")
    assert err.value.status == 409
    hist = await client.history(APP, "beta")
    assert [(h["action"], h["build"]) for h in hist] == [
        ("rollback", 1),
        ("publish", 2),
        ("publish", 1),
    ]
    with pytest.raises(TrackerRefusedError) as err:
        await client.promote(APP, "stable", bytes(32))
    assert err.value.status == 409


async def test_long_poll_wakes_within_a_second(
    client: TrackerClient, tracker: Tracker, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    await publish(client, make_manifest(1))
    head = await client.latest(APP, "stable")
    assert head is not None
    second = make_manifest(2)
    got, delay = await long_poll_woken(
        tracker, client, lambda: publish(client, second), since=head.seq
    )
    assert got.build == 2 and delay < 1.0
    # an unchanged channel answers with the same head after `wait`
    with trio.fail_after(2):
        same = await client.latest(APP, "stable", since=got.seq, wait=0.1)
    assert same is not None and same.seq == got.seq


# ------------------------------------------------------------------ announces


async def announce(
    client: TrackerClient, key: Ed25519PrivateKey, mid: bytes, port: int = 7000, **kw: Any
) -> Any:
    return await client.announce(key, app=APP, manifest_id=mid, port=port, **kw)


async def test_announce_ranks_bounds_and_excludes_self(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    old, new = make_manifest(1), make_manifest(2)
    await publish(client, old)
    await publish(client, new)
    nodes = [keys.generate_key() for _ in range(60)]
    for i, k in enumerate(nodes[:55]):
        await announce(client, k, new.id, 7000 + i, size=100, left=100 - i, numwant=0)
    for i, k in enumerate(nodes[55:]):
        await announce(client, k, old.id, 8000 + i, size=100, left=0, numwant=0)
    me = nodes[0]
    res = await announce(client, me, new.id, 7000, size=100, left=100, numwant=50)
    ids = [p.node_id for p in res.peers]
    assert len(ids) == 50 and keys.node_id_of(keys.public_key_bytes(me)) not in ids
    assert all(p.manifest == new.id for p in res.peers)  # the build's own swarm comes first
    assert res.leechers == 55 and res.seeders == 0
    # among equal scores, who holds more ranks first
    lefts = [round((1 - p.progress) * 100) for p in res.peers]
    assert lefts == sorted(lefts)
    # a small swarm: partial seeds of the other build fill the answer
    few = make_manifest(3)
    await publish(client, few)
    await announce(client, nodes[1], few.id, 7001, size=100, left=50, numwant=0)
    res = await announce(client, me, few.id, 7000, size=100, left=100, numwant=50)
    assert res.peers[0].manifest == few.id
    assert {p.manifest for p in res.peers[1:]} <= {old.id, new.id}
    assert len(res.peers) == 50
    # stopped leaves the swarm
    await announce(client, nodes[1], few.id, 7001, event="stopped", numwant=0)
    res = await announce(client, me, few.id, 7000, numwant=50)
    assert all(p.manifest != few.id for p in res.peers)


async def test_peers_expire_without_reannounce(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    clock = [time.time()]
    tracker.config.clock = lambda: clock[0]
    m = make_manifest(1)
    await publish(client, m)
    a, b = keys.generate_key(), keys.generate_key()
    await announce(client, a, m.id, numwant=0)
    assert len((await announce(client, b, m.id)).peers) == 1
    clock[0] += tracker.config.ttl + 1
    # b's message is signed with the real clock; keep within the skew window
    assert clock[0] - time.time() < 300
    assert (await announce(client, b, m.id)).peers == []


async def test_address_is_the_seen_one_unless_plausible(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    lan = client_for(tracker, ip="192.168.1.20")
    public = client_for(tracker, ip="8.8.4.4")
    m = make_manifest(1)
    await publish(lan, m)
    k1, k2, k3 = keys.generate_key(), keys.generate_key(), keys.generate_key()
    await announce(lan, k1, m.id, ip="192.168.1.99", numwant=0)  # LAN: trusted claim
    await announce(public, k2, m.id, ip="1.1.1.1", numwant=0)  # public: ignored
    res = await announce(lan, k3, m.id)
    assert sorted(p.ip for p in res.peers) == ["192.168.1.99", "8.8.4.4"]


async def test_bad_node_messages_get_4xx_and_store_nothing(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await publish(client, m)
    key = keys.generate_key()
    pub = keys.format_public_key(keys.public_key_bytes(key))
    http = client._http
    good = {
        "key": pub,
        "ts": int(time.time()),
        "nonce": os.urandom(8).hex(),
        "app": APP,
        "manifest": m.id.hex(),
        "port": 7000,
    }

    async def post(
        obj: Any,
        *,
        sign_with: Ed25519PrivateKey = key,
        raw: bytes | None = None,
        sig: str | None = None,
    ) -> httpx.Response:
        body = raw if raw is not None else json.dumps(obj).encode()
        signature = sig if sig is not None else keys.sign(sign_with, ANNOUNCE_DOMAIN, body).hex()
        return await http.post(
            "/v1/announce", content=body, headers={"X-P2PNode-Signature": signature}
        )

    bad: list[tuple[dict[str, Any] | None, dict[str, Any], int]] = [
        ({**good, "port": -1}, {}, 400),
        ({**good, "port": 65536}, {}, 400),
        ({**good, "port": "7000"}, {}, 400),
        ({**good, "manifest": "ab"}, {}, 400),
        ({**good, "manifest": os.urandom(32).hex()}, {}, 404),  # not published here
        ({**good, "app": "../etc"}, {}, 400),
        ({**good, "event": "bogus"}, {}, 400),
        ({**good, "size": 10, "left": 11}, {}, 400),
        ({**good, "extra": 1}, {}, 400),
        ({**good, "numwant": 51}, {}, 400),
        ({**good, "ip": "224.0.0.1"}, {}, 400),
        ({**good, "ts": int(time.time()) - 3600}, {}, 403),  # stale
        (good, {"sign_with": keys.generate_key()}, 403),  # signed by someone else
        (good, {"sig": "zz"}, 400),
        (None, {"raw": b"[1, 2]"}, 400),
        (None, {"raw": b"x" * 5000}, 413),
    ]
    for obj, kw, status in bad:
        resp = await post(obj, **kw)
        assert resp.status_code == status, (obj, kw, resp.text)
        err = resp.json()
        assert set(err) == {"error", "message", "fix"}
    assert tracker.swarm.state.live_members(time.time()) == 0  # type: ignore[attr-defined]
    # the genuine one is accepted once; its replay is refused
    body = json.dumps(good).encode()
    sig = keys.sign(key, ANNOUNCE_DOMAIN, body).hex()
    assert (await post(None, raw=body, sig=sig)).status_code == 200
    replay = await post(None, raw=body, sig=sig)
    assert replay.status_code == 409 and "replay" in replay.json()["message"]


async def test_attached_records_are_relayed_and_verified(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await publish(client, m)
    a, b = keys.generate_key(), keys.generate_key()
    src_a = TrackerPeerSource(client, a, "127.0.0.1", 7001)
    src_b = TrackerPeerSource(client, b, "127.0.0.1", 7002)
    assert await src_a.find_peers(m.id, APP) == []
    recs = await src_b.find_peers(m.id, APP)
    assert {r.port for r in recs} == {7001}
    assert {r.topic for r in recs} == {Topic.manifest(m.id), Topic.app(APP)}
    assert recs[0].topic == Topic.manifest(m.id)
    # a record signed by another node cannot be attached
    other = make_record(
        keys.generate_key(), Topic.manifest(m.id), "127.0.0.1", 9, now=time.time(), ttl=600
    )
    with pytest.raises(TrackerRefusedError) as err:
        await announce(client, a, m.id, records=[other.encoded])
    assert err.value.status == 403


async def test_records_are_verified_once_per_announcer(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    """Nodes re-send the same records until half expired; the tracker checks them once."""
    m = make_manifest(1)
    await publish(client, m)
    a, b = keys.generate_key(), keys.generate_key()
    src_a = TrackerPeerSource(client, a, "127.0.0.1", 7001)
    for _ in range(5):
        await src_a.find_peers(m.id, APP)
    assert tracker._records.checked == 1
    # the same bytes announced by another key are still refused: the cache is per announcer
    rec = make_record(a, Topic.manifest(m.id), "127.0.0.1", 7001, now=time.time(), ttl=600)
    await announce(client, a, m.id, 7001, records=[rec.encoded])
    with pytest.raises(TrackerRefusedError) as err:
        await announce(client, b, m.id, 7002, records=[rec.encoded])
    assert err.value.status == 403
    # once its records expire, the cached verdict is no longer used: refused as expired
    short = make_record(a, Topic.app(APP), "127.0.0.1", 7001, now=time.time() - 500, ttl=600)
    await announce(client, a, m.id, 7001, records=[short.encoded])
    checked = tracker._records.checked
    tracker.config.clock = lambda: time.time() + 150  # within the signature's skew window
    with pytest.raises(TrackerRefusedError) as err:
        await announce(client, a, m.id, 7001, records=[short.encoded])
    assert err.value.status == 400 and "expired" in str(err.value)
    assert tracker._records.checked == checked  # it failed the check, nothing cached


# ------------------------------------------------------------------ reports and quality


async def test_reports_score_rank_and_flag(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await publish(client, m)
    good, slow, bad, me = (keys.generate_key() for _ in range(4))
    nid = {k: keys.node_id_of(keys.public_key_bytes(k)) for k in (good, slow, bad, me)}
    for port, k in enumerate((slow, bad, good), start=7001):
        await announce(client, k, m.id, port, size=10, left=0, numwant=0)
    reporters = [keys.generate_key() for _ in range(3)]
    await client.report(
        reporters[0],
        [
            PeerQualityReport(nid[good], bytes=50 << 20, rate=20_000_000),
            PeerQualityReport(nid[slow], bytes=1 << 20, rate=100_000, failures=3),
        ],
    )
    res = await announce(client, me, m.id)
    assert [p.node_id for p in res.peers] == [nid[good], nid[bad], nid[slow]]
    scores = {p.node_id: p.score for p in res.peers}
    assert scores[nid[good]] > scores[nid[bad]] > scores[nid[slow]]
    # one reporter's word does not flag; three distinct reporters do
    for i, r in enumerate(reporters):
        await client.report(r, [PeerQualityReport(nid[bad], bytes=1 << 20, corrupt=2)])
        res = await announce(client, me, m.id)
        present = nid[bad] in [p.node_id for p in res.peers]
        assert present == (i < 2)
    stats = (await client._http.get("/v1/stats")).json()
    assert stats["quality"]["flagged"] == [nid[bad].hex()]
    peer = (await client._http.get(f"/v1/peers/{nid[bad].hex()}")).json()
    assert peer["flagged"] and peer["corrupt_reporters"] == 3 and peer["score"] == 0
    # the operator clears it
    resp = await client._http.delete(
        f"/v1/peers/{nid[bad].hex()}", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert resp.json()["cleared"] is True
    res = await announce(client, me, m.id)
    assert nid[bad] in [p.node_id for p in res.peers]


async def test_reports_are_validated_and_rate_limited(
    tracker: Tracker, client: TrackerClient
) -> None:
    r = keys.generate_key()
    me = keys.node_id_of(keys.public_key_bytes(r))
    with pytest.raises(TrackerRefusedError) as err:
        await client.report(r, [PeerQualityReport(me, bytes=1)])  # about itself
    assert err.value.status == 400
    with pytest.raises(TrackerRefusedError) as err:
        await client.report(r, [PeerQualityReport(os.urandom(20)) for _ in range(65)])
    assert err.value.status == 400
    with pytest.raises(TrackerRefusedError) as err:
        await client.report(r, [PeerQualityReport(os.urandom(20), rate=-1)])
    assert err.value.status == 400
    burst = int(tracker.config.report_burst)
    for _ in range(burst):
        await client.report(r, [PeerQualityReport(os.urandom(20), bytes=1)])
    with pytest.raises(TrackerRefusedError) as err:
        await client.report(r, [PeerQualityReport(os.urandom(20), bytes=1)])
    assert err.value.status == 429


async def test_client_rate_limit_and_body_cap(
    make_tracker: Callable[..., Tracker],
) -> None:
    t = make_tracker("limited", client_rate=5.0, client_burst=5.0)
    c = client_for(t)
    codes = [(await c._http.get("/healthz")).status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and codes[-1] == 429
    other = client_for(t, ip="10.0.0.2")  # another client is not affected
    assert (await other._http.get("/healthz")).status_code == 200
    big = await other._http.post(
        "/v1/apps",
        content=b"{" + b" " * 10_000 + b"}",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert big.status_code == 413


# ------------------------------------------------------------------ operators


async def test_stats_offload_adoption_and_metrics(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await publish(client, m)
    a, b, c = (keys.generate_key() for _ in range(3))
    await announce(client, a, m.id, event="started", size=1000, left=1000, numwant=0)
    await announce(client, a, m.id, size=1000, left=400, from_peers=300, from_cdn=300, numwant=0)
    await announce(
        client,
        a,
        m.id,
        event="completed",
        size=1000,
        left=0,
        from_peers=700,
        from_cdn=300,
        numwant=0,
    )
    await announce(
        client,
        b,
        m.id,
        event="completed",
        size=1000,
        left=0,
        from_peers=800,
        from_cdn=200,
        numwant=0,
    )
    # a repeated completed (a restart) does not count twice, and counters never go back
    await announce(
        client, b, m.id, event="completed", size=1000, left=0, from_peers=10, from_cdn=0, numwant=0
    )
    await announce(client, c, m.id, size=1000, left=900, from_cdn=100, numwant=0)
    stats = (await client._http.get("/v1/stats")).json()
    [rel] = stats["releases"]
    assert rel["manifest_id"] == m.id.hex() and rel["version"] == "1.1"
    assert (rel["seeders"], rel["leechers"], rel["completed"]) == (2, 1, 2)
    assert (rel["bytes_from_peers"], rel["bytes_from_cdn"]) == (1500, 600)
    assert rel["offload_ratio"] == pytest.approx(1500 / 2100)
    assert sum(n for _, n in rel["adoption"]) == 2
    assert stats["load"]["requests_per_s"] > 0
    text = (await client._http.get("/metrics")).text
    label = f'app="game",manifest="{m.id.hex()}",version="1.1"'
    assert f"tracker_swarm_seeders{{{label}}} 2.0" in text
    assert f"tracker_release_from_peers_bytes_total{{{label}}} 1500.0" in text
    assert 'tracker_announces_total{event="completed"} 3.0' in text
    assert 'tracker_http_requests_total{route="announce",status="200"}' in text
    assert "tracker_http_request_duration_seconds_bucket" in text


async def test_healthz_openapi_and_dashboard_assets(
    tracker: Tracker, client: TrackerClient
) -> None:
    http = client._http
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")  # its content: tests/tracker/test_openapi.py
    page = await http.get("/dashboard")
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert (await http.get("/dashboard/dashboard.js")).status_code == 200
    assert (await http.get("/dashboard/../app.py")).status_code == 404
