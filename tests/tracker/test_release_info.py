"""The tracker's feed, history and stats carry each build's update type and notes, read from the
signed manifest the registry keeps (tracker/releaseinfo.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.discovery.tracker_api import ChannelHead
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release.metadata import ReleaseInfo, UpdateType
from tests.support.tracker import APP
from tracker import Tracker

NOTES = "Fixes the <b>crash</b> & the hang.\n" * 3


async def test_heads_history_and_stats_carry_type_and_notes(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    plain = make_manifest(1)
    critical = make_manifest(2, info=ReleaseInfo(UpdateType.CRITICAL, NOTES, "0.1.0"))
    assert (await client.publish(APP, "stable", plain.encode()))["update_type"] is None
    res = await client.publish(APP, "stable", critical.encode())
    assert res["update_type"] == "critical"
    head = await client.latest(APP, "stable")
    assert head is not None and head.critical and head.notes == NOTES
    hist = await client.history(APP, "stable")
    assert [(h["build"], h["update_type"]) for h in hist] == [(2, "critical"), (1, None)]
    back = await client.rollback(APP, "stable")
    assert back.build == 1 and back.update_type is None and not back.critical
    transport = httpx.ASGITransport(app=tracker)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        info = (await http.get(f"/v1/apps/{APP}")).json()
        assert info["channels"][0]["update_type"] is None and info["channels"][0]["notes"] == ""
        await client.announce(
            keys.generate_key(), app=APP, manifest_id=critical.id, port=7000, size=1000,
            left=0, event="completed", numwant=0,
        )  # fmt: skip
        stats = (await http.get("/v1/stats")).json()
    (rel,) = stats["releases"]
    assert rel["update_type"] == "critical" and rel["notes"] == NOTES


async def test_a_fresh_replica_reads_the_metadata_from_the_stored_manifest(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    signed = make_manifest(3, info=ReleaseInfo(UpdateType.BETA, "try me"))
    await client.publish(APP, "stable", signed.encode())
    tracker.infos._cache = type(tracker.infos._cache)(16)  # as a restart would leave it
    parsed = tracker.infos.parsed
    for _ in range(3):
        head = await client.latest(APP, "stable")
        assert head is not None and head.update_type == "beta" and head.notes == "try me"
    assert tracker.infos.parsed == parsed + 1  # once, then from the cache


def test_heads_from_older_or_newer_trackers_parse() -> None:
    base: dict[str, Any] = {
        "app": APP, "channel": "stable", "seq": 1, "manifest_id": "00" * 32, "build": 1,
        "version": "1",
    }  # fmt: skip
    assert ChannelHead.from_json(base).update_type is None  # a tracker older than the fields
    odd = ChannelHead.from_json({**base, "update_type": "apocalyptic", "notes": 7})
    assert odd.update_type is None and odd.notes == ""
    full = ChannelHead.from_json({**base, "update_type": "critical", "notes": "n"})
    assert full.critical and ChannelHead.from_json(full.to_json()) == full
