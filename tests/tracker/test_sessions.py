"""Announce sessions: after one verified announce, the same key from the same address is not
verified again until the token expires (tracker.sessions.AnnounceSessions)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from unittest import mock

from p2pnode.discovery.tracker import ANNOUNCE_DOMAIN, SIGNATURE_HEADER, TrackerClient
from p2pnode.discovery.tracker_api import SESSION_HEADER
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP, client_for
from tracker import Tracker
from tracker.sessions import AnnounceSessions

NODE = bytes(range(20))


def test_tokens_are_bound_to_node_address_and_time() -> None:
    s = AnnounceSessions(ADMIN, ttl=600)
    now = 1_800_000_000.0
    t = s.issue(NODE, "10.0.0.1", now)
    assert s.valid(t, NODE, "10.0.0.1", now + 599)
    assert not s.valid(t, NODE, "10.0.0.1", now + 600)  # expired
    assert not s.valid(t, NODE, "10.0.0.2", now)  # another address
    assert not s.valid(t, bytes(20), "10.0.0.1", now)  # another node
    assert not AnnounceSessions("another-admin-token-0123456", ttl=600).valid(
        t, NODE, "10.0.0.1", now
    )  # another tracker (replicas share the admin token, hence the key)
    flipped = t[:-1] + ("0" if t[-1] != "0" else "1")
    assert not s.valid(flipped, NODE, "10.0.0.1", now)
    for junk in (None, "", "zz" * 24, t[:46], t + "00"):
        assert not s.valid(junk, NODE, "10.0.0.1", now)
    # an expiry further out than the ttl was not issued by us
    far = (int(now) + 10_000).to_bytes(8, "big").hex() + t[16:]
    assert not s.valid(far, NODE, "10.0.0.1", now)


def test_checked_tokens_are_remembered_within_a_bound() -> None:
    """valid() remembers the tokens whose MAC it checked (the same checks apply to a
    remembered one, above); the oldest are forgotten past CHECKED_MAX and checked again."""
    s = AnnounceSessions(ADMIN, ttl=600)
    s.CHECKED_MAX = 2
    now = 1_800_000_000.0
    nodes = [bytes([i]) * 20 for i in range(3)]
    tokens = [s.issue(n, "10.0.0.1", now) for n in nodes]
    assert all(s.valid(t, n, "10.0.0.1", now) for t, n in zip(tokens, nodes, strict=True))
    assert list(s._checked) == tokens[1:]
    assert s.valid(tokens[0], nodes[0], "10.0.0.1", now + 1)  # checked again
    assert not s.valid(tokens[0], nodes[1], "10.0.0.1", now + 1)


def _body(key: object, mid: bytes) -> bytes:
    return json.dumps(
        {
            "key": keys.format_public_key(keys.public_key_bytes(key)),  # type: ignore[arg-type]
            "ts": int(time.time()),
            "nonce": os.urandom(12).hex(),
            "app": APP,
            "manifest": mid.hex(),
            "port": 7000,
        }
    ).encode()


async def test_a_session_spares_the_signature_check_only_where_it_was_issued(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await client.publish(APP, "stable", m.encode())
    node = keys.generate_key()
    http = client._http
    body = _body(node, m.id)
    sig = keys.sign(node, ANNOUNCE_DOMAIN, body).hex()
    first = await http.post("/v1/announce", content=body, headers={SIGNATURE_HEADER: sig})
    assert first.status_code == 200
    token = first.json()["session"]
    assert first.json()["session_ttl"] == tracker.sessions.ttl

    with mock.patch(
        "p2pnode.release.keys.verify_signature", side_effect=AssertionError("verified")
    ):
        body = _body(node, m.id)
        sig = keys.sign(node, ANNOUNCE_DOMAIN, body).hex()
        again = await http.post(
            "/v1/announce", content=body, headers={SIGNATURE_HEADER: sig, SESSION_HEADER: token}
        )
        assert again.status_code == 200
        assert "session" not in again.json()  # not renewed without a verified signature
        # the replay guard still holds
        replay = await http.post(
            "/v1/announce", content=body, headers={SIGNATURE_HEADER: sig, SESSION_HEADER: token}
        )
        assert replay.status_code == 409

    # from another address the token is worthless: a forged signature is caught
    elsewhere = client_for(tracker, ip="10.9.9.9")
    body = _body(node, m.id)
    forged = await elsewhere._http.post(
        "/v1/announce", content=body, headers={SIGNATURE_HEADER: "00" * 64, SESSION_HEADER: token}
    )
    assert forged.status_code == 403
    # another key cannot ride this node's session either
    other = keys.generate_key()
    body = _body(other, m.id)
    forged = await http.post(
        "/v1/announce", content=body, headers={SIGNATURE_HEADER: "00" * 64, SESSION_HEADER: token}
    )
    assert forged.status_code == 403
    await elsewhere._http.aclose()


async def test_the_client_uses_its_session(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    m = make_manifest(1)
    await client.publish(APP, "stable", m.encode())
    node = keys.generate_key()
    await client.announce(node, app=APP, manifest_id=m.id, port=7000)
    calls = []
    real = keys.verify_signature

    def counting(*a: object) -> None:
        calls.append(a)
        real(*a)  # type: ignore[arg-type]

    with mock.patch("p2pnode.release.keys.verify_signature", side_effect=counting):
        for _ in range(5):
            await client.announce(node, app=APP, manifest_id=m.id, port=7000)
    assert calls == []
