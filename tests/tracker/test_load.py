"""Bandwidth and load end to end: simulated nodes announce and report two releases through an
in-process tracker (SQLite; Redis for swarm and registry; PostgreSQL for the registry); the
forecast recorded at the second publish is printed beside what followed, through the API."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery import tracker_api
from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release.patchmeta import Patch
from tests.support.tracker import ADMIN, APP, client_for
from tracker import Tracker
from tracker.cli_load import print_forecast

CHUNK = 1000
NODES = 20
PER_MINUTE = 2
#: the first nodes of each release find no peer: they fetch from the CDN
FROM_CDN = 6


def build(
    publisher: Ed25519PrivateKey,
    n: int,
    chunks: list[int],
    now: float,
    channel: str = "stable",
    mirrors: tuple[str, ...] = (),
    patches: tuple[Patch, ...] = (),
) -> M.SignedManifest:
    refs = tuple(
        M.ChunkRef(blake3.blake3(b"chunk %d" % c).digest(), i * CHUNK, CHUNK)
        for i, c in enumerate(chunks)
    )
    m = M.Manifest(
        app=APP,
        version=f"1.{n}",
        build=n,
        channel=channel,
        created=int(now) - 10,
        expires=int(now) + 7200,
        key=keys.public_key_bytes(publisher),
        files=(M.FileEntry("data.bin", CHUNK * len(chunks), M.MODE_FILE, refs),),
        mirrors=mirrors,
        patches=patches,
    )
    return M.sign(m, publisher)


class Clock:
    """The tracker's and the nodes' clock, moved by the test (signed bodies carry it)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()) // 60 * 60)

    def __call__(self) -> float:
        return self.now


async def adopt(
    t: Tracker,
    client: TrackerClient,
    clock: Clock,
    nodes: list[Ed25519PrivateKey],
    m: M.SignedManifest,
    need: int,
    reused: int,
    from_cdn: int = FROM_CDN,
) -> None:
    """Every node takes ``m``, ``PER_MINUTE`` a minute, the first ``from_cdn`` from the CDN;
    the tracker's housekeeping runs as each minute ends."""
    for i, k in enumerate(nodes):
        cdn = i < from_cdn
        await client.announce(
            k, app=APP, manifest_id=m.id, port=0, event="completed", size=need, left=0,
            from_cdn=need if cdn else 0, from_peers=0 if cdn else need, numwant=0,
        )  # fmt: skip
        outcome = {"app": APP, "manifest": m.id.hex(), "to_build": m.manifest.build}
        await client.report_outcome(
            k,
            {**outcome, "kind": "install" if reused == 0 else "update", "outcome": "success",
             "bytes_cdn": need if cdn else 0, "bytes_peers": 0 if cdn else need,
             "bytes_reused": reused},
        )  # fmt: skip
        if i % PER_MINUTE == PER_MINUTE - 1:
            clock.now += 60
            await t.load.tick(clock.now + 1, force=True)


async def clocked_tracker(
    backend: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest | None = None,
) -> tuple[Clock, Tracker, TrackerClient]:
    """A tracker on ``backend`` (sqlite, redis, postgres) whose clock, and the signing clock of
    the nodes' announces, is a :class:`Clock` the test moves; app ``APP`` registered."""
    clock = Clock()
    monkeypatch.setattr(tracker_api, "time", types.SimpleNamespace(time=clock))
    kw: dict[str, Any] = {"clock": clock, "client_rate": 0.0}
    if backend == "redis":
        assert request is not None
        url = request.getfixturevalue("redis_url")
        kw.update(redis_url=url, registry_url=url)
    elif backend == "postgres":
        assert request is not None
        kw.update(registry_url=request.getfixturevalue("pg_url"))
    t = make_tracker(**kw)
    client = client_for(t)
    await client.add_app(APP, keys.public_key_bytes(publisher))
    return clock, t, client


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
async def test_a_forecast_is_printed_beside_what_followed(
    backend: str,
    tmp_path: Path,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock, t, client = await clocked_tracker(backend, make_tracker, publisher, monkeypatch, request)
    http = client._http
    nodes = [keys.generate_key() for _ in range(NODES)]
    t0 = clock.now

    one = build(publisher, 1, [1, 2, 3, 4], clock.now)
    first = await client.publish(APP, "stable", one.encode())
    assert first["forecast"]["nodes"] == 0 and first["forecast"]["basis"] == "default"
    await adopt(t, client, clock, nodes, one, 4 * CHUNK, 0)

    clock.now = t0 + 1800
    two = build(publisher, 2, [1, 2, 5, 6], clock.now)  # half of it is new
    # a dry run first: the same forecast, recorded nowhere
    dry = await http.post(
        f"/v1/apps/{APP}/channels/stable/forecast",
        content=two.encode(),
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert dry.status_code == 200, dry.text
    assert (await http.get(f"/v1/apps/{APP}/builds/2/forecast")).status_code == 404
    answer = await client.publish(APP, "stable", two.encode())
    f = answer["forecast"]
    assert f["nodes"] == NODES and f["need_bytes"] == 2 * CHUNK and f["size_bytes"] == 4 * CHUNK
    assert f["basis"] == "history" and f["history_builds"] == [1]
    # build 1: minutes 0-2 (6 nodes) took every byte from the CDN, the rest from peers
    assert f["offload"] == [0.0, 1.0, 1.0, 1.0]
    expected_total = FROM_CDN * 2 * CHUNK
    assert f["cdn_total"] == expected_total == dry.json()["cdn_total"]
    assert f["cdn_peak_per_min"] == PER_MINUTE * 2 * CHUNK

    await adopt(t, client, clock, nodes, two, 2 * CHUNK, 2 * CHUNK)
    res = await http.get(f"/v1/apps/{APP}/builds/2/forecast")
    assert res.status_code == 200, res.text
    report = res.json()
    actual = report["actual"]
    print(f"\n[{backend}] build 2 forecast vs what followed (CDN egress)")
    print(f"  total: predicted {f['cdn_total']} B, actual {actual['cdn_actual_total']} B")
    print(
        f"  peak:  predicted {f['cdn_peak_per_min']} B/min, "
        f"actual {actual['cdn_actual_peak_per_min']} B/min"
    )
    predicted = dict(map(tuple, report["forecast"]["curve"]))
    for at, b in actual["actual"]:
        minute = (at - int(t0 + 1800)) // 60
        print(f"  minute {minute:2d}: predicted {predicted.get(at, 0):5d} B, actual {b:5d} B")
    assert actual["cdn_actual_total"] == expected_total
    assert actual["cdn_predicted_so_far"] == expected_total
    assert actual["total_ratio"] == 1.0 and actual["peak_ratio"] == 1.0
    out = capsys.readouterr().out
    assert "predicted 12000 B, actual 12000 B" in out
    with capsys.disabled():  # shown in the test run's output, -s or not
        print(out, end="")

    traffic = (await http.get(f"/v1/apps/{APP}/builds/2/traffic")).json()
    assert traffic["totals"] == {
        "completed": NODES,
        "peers": (NODES - FROM_CDN) * 2 * CHUNK,
        "cdn": FROM_CDN * 2 * CHUNK,
        "reused": NODES * 2 * CHUNK,
        "patches": 0,
        "patches_cdn": 0,
        "patches_peers": 0,
    }
    assert traffic["offload_ratio"] == (NODES - FROM_CDN) / NODES
    assert [r["completed"] for r in traffic["series"]] == [PER_MINUTE] * (NODES // PER_MINUTE)

    load = (await http.get(f"/v1/apps/{APP}/load")).json()
    hour = load["release_hour"]
    assert hour["recommended_hour"] == int(t0) % 86400 // 3600 or hour["announces"] == 2 * NODES
    assert sum(hour["histogram"]) == hour["announces"] == 2 * NODES
    assert [b["build"] for b in load["forecasts"]] == [2, 1]
    assert load["forecasts"][0]["actual"]["cdn_actual_total"] == expected_total

    for bad in ("/v1/apps/game/builds/x/traffic", "/v1/apps/game/builds/99/forecast"):
        assert (await http.get(bad)).status_code in (400, 404)
    if backend == "postgres":  # a replica on another host (a DIR of its own) reads the same
        pg = request.getfixturevalue("pg_url")  # the same database as the first tracker's
        other = make_tracker("other", clock=clock, client_rate=0.0, registry_url=pg)
        assert not any((tmp_path / d / "traffic.db").exists() for d in ("t", "other"))
        for read in ("forecasts", "series"):
            mine = await trio.to_thread.run_sync(getattr(t.load.store, read), two.id)
            theirs = await trio.to_thread.run_sync(getattr(other.load.store, read), two.id)
            assert mine == theirs and mine not in ([], (None, []))
    await client._http.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
async def test_a_delta_builds_forecast_counts_the_patches_the_cdn_serves(
    backend: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Build 2 is a patch from build 1 (no chunk to fetch): the first nodes fetch the patch
    from the CDN and count it in from_cdn, as nodes do, and report it in patches_cdn. The
    forecast predicts that egress (the patches at build 1's offload), and the comparison
    sets it beside the series' cdn: like with like."""
    clock, t, client = await clocked_tracker(backend, make_tracker, publisher, monkeypatch, request)
    nodes = [keys.generate_key() for _ in range(NODES)]
    t0 = clock.now
    one = build(publisher, 1, [1, 2, 3, 4], clock.now)
    await client.publish(APP, "stable", one.encode())
    await adopt(t, client, clock, nodes, one, 4 * CHUNK, 0)

    clock.now = t0 + 1800
    made = tuple(blake3.blake3(b"chunk %d" % c).digest() for c in (5, 6))
    base = tuple((blake3.blake3(b"chunk %d" % c).digest(), CHUNK) for c in (3, 4))
    size = 300
    patch = Patch(one.id, "data.bin", 2, 2, base, 0, size, blake3.blake3(b"p").digest())
    two = build(publisher, 2, [1, 2, 5, 6], clock.now, patches=(patch,))
    assert [c.id for c in two.manifest.files[0].chunks[2:]] == list(made)
    f = (await client.publish(APP, "stable", two.encode()))["forecast"]
    assert f["need_bytes"] == 0 and f["patch_need_bytes"] == size
    assert f["patches_total"] == NODES * size
    # build 1's offload: the first 6 nodes (its first quarter) took everything from the CDN
    assert f["cdn_total"] == f["cdn_patches_total"] == FROM_CDN * size
    assert f["cdn_chunks_total"] == 0

    for i, k in enumerate(nodes):
        cdn = i < FROM_CDN
        await client.announce(
            k, app=APP, manifest_id=two.id, port=0, event="completed", size=size, left=0,
            from_cdn=size if cdn else 0, from_peers=0 if cdn else size, numwant=0,
        )  # fmt: skip
        await client.report_outcome(
            k,
            {"app": APP, "manifest": two.id.hex(), "to_build": 2, "from_build": 1,
             "kind": "update", "outcome": "success", "bytes_cdn": size if cdn else 0,
             "bytes_peers": 0 if cdn else size, "bytes_reused": 4 * CHUNK - 2 * CHUNK,
             "bytes_patches": size, "bytes_patches_cdn": size if cdn else 0,
             "bytes_patches_peers": 0 if cdn else size},
        )  # fmt: skip
        if i % PER_MINUTE == PER_MINUTE - 1:
            clock.now += 60
            await t.load.tick(clock.now + 1, force=True)
    report = (await client._http.get(f"/v1/apps/{APP}/builds/2/forecast")).json()
    a = report["actual"]
    assert a["cdn_actual_total"] == a["cdn_patches_actual_total"] == FROM_CDN * size
    assert a["cdn_predicted_so_far"] == FROM_CDN * size and a["total_ratio"] == 1.0
    assert a["patches_actual_total"] == NODES * size
    print_forecast(report)
    out = capsys.readouterr().out
    assert "of which delta patches" in out
    with capsys.disabled():
        print(f"\n[{backend}] a delta build's forecast beside what followed\n{out}", end="")
    await client._http.aclose()


async def test_answers_include_the_minute_not_sampled_yet(
    make_tracker: Callable[..., Tracker], publisher: Ed25519PrivateKey
) -> None:
    """No housekeeping ran: the swarm's counters now and the outcomes not written yet are in
    the answer all the same (it is never a minute behind)."""
    t = make_tracker(client_rate=0.0)
    client = client_for(t)
    await client.add_app(APP, keys.public_key_bytes(publisher))
    m = build(publisher, 1, [1, 2], time.time())
    await client.publish(APP, "stable", m.encode())
    k = keys.generate_key()
    await client.announce(
        k, app=APP, manifest_id=m.id, port=0, event="completed", size=2 * CHUNK, left=0,
        from_cdn=CHUNK, from_peers=CHUNK, numwant=0,
    )  # fmt: skip
    fields = {"app": APP, "manifest": m.id.hex(), "to_build": 1, "kind": "install"}
    await client.report_outcome(k, {**fields, "outcome": "success", "bytes_patches": 77})
    got = (await client._http.get(f"/v1/apps/{APP}/builds/1/traffic")).json()
    assert got["totals"] == {"completed": 1, "peers": CHUNK, "cdn": CHUNK, "reused": 0,
                             "patches": 77, "patches_cdn": 0, "patches_peers": 0}  # fmt: skip
    assert len(got["series"]) == 1
    await t.load.tick(time.time() + 60, force=True)  # sampled and written: the same answer
    again = (await client._http.get(f"/v1/apps/{APP}/builds/1/traffic")).json()
    assert again["totals"] == got["totals"]
    await client._http.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
async def test_a_release_past_the_series_retention_still_shapes_the_next_forecast(
    backend: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    clock, t, client = await clocked_tracker(backend, make_tracker, publisher, monkeypatch, request)
    nodes = [keys.generate_key() for _ in range(NODES)]
    t0 = clock.now
    one = build(publisher, 1, [1, 2, 3, 4], clock.now)
    await client.publish(APP, "stable", one.encode())
    await adopt(t, client, clock, nodes, one, 4 * CHUNK, 0)
    clock.now = t0 + 2 * 86400  # a day on: its first day is kept with its forecast
    await t.load.tick(clock.now, force=True)
    (kept,) = await trio.to_thread.run_sync(t.load.store.forecasts, one.id)
    assert sum(r["completed"] for r in kept["profile"]) == NODES
    clock.now = t0 + 10 * 86400  # its minutes are gone
    await t.load.tick(clock.now, force=True)
    assert (await trio.to_thread.run_sync(t.load.store.series, one.id)) == (None, [])
    for k in nodes:  # the fleet is still there (seen within the fleet's 3 days)
        await client.announce(
            k, app=APP, manifest_id=one.id, port=0, size=4 * CHUNK, left=0, numwant=0
        )
    two = build(publisher, 2, [1, 2, 5, 6], clock.now)
    f = (await client.publish(APP, "stable", two.encode()))["forecast"]
    assert f["basis"] == "history" and f["history_builds"] == [1]
    assert f["offload"] == [0.0, 1.0, 1.0, 1.0] and f["cdn_total"] == FROM_CDN * 2 * CHUNK
    got = (await client._http.get(f"/v1/apps/{APP}/builds/1/forecast")).json()
    assert "profile" not in got["forecast"]
    await client._http.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
async def test_promotes_and_rollout_raises_get_forecasts_of_their_own(
    backend: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock, t, client = await clocked_tracker(backend, make_tracker, publisher, monkeypatch, request)
    nodes = [keys.generate_key() for _ in range(NODES)]
    one = build(publisher, 1, [1, 2, 3, 4], clock.now)
    await client.publish(APP, "stable", one.encode())
    await adopt(t, client, clock, nodes, one, 4 * CHUNK, 0)
    # a staged rollout of build 2, raised to 50%, then completed: three events of one build
    two = build(publisher, 2, [1, 2, 5, 6], clock.now, mirrors=("https://a.example/",
                                                                "https://b.example/"))  # fmt: skip
    staged = (await client.publish(APP, "stable", two.encode(), rollout=10))["forecast"]
    assert staged["event"] == "publish" and staged["adopters"] == NODES * 0.1
    clock.now += 120
    await client.change_rollout(APP, "stable", "raise", percent=50)
    await client.change_rollout(APP, "stable", "halt")
    await client.change_rollout(APP, "stable", "raise", percent=60)  # halted: no node let in
    await client.change_rollout(APP, "stable", "resume")
    clock.now += 120
    await client.change_rollout(APP, "stable", "complete")
    http = client._http
    report = (await http.get(f"/v1/apps/{APP}/builds/2/forecast")).json()
    events = [e["forecast"] for e in report["events"]]
    assert [(f["event"], f["was_percent"], f["percent"]) for f in events] == [
        ("publish", 0, 10), ("rollout-raise", 10, 50), ("rollout-complete", 60, 100)
    ]  # fmt: skip
    assert [f["adopters"] for f in events] == [NODES * 0.1, NODES * 0.4, NODES * 0.4]
    assert report["forecast"] == events[0]
    assert all(e["actual"]["elapsed_s"] <= 120 for e in report["events"][:2])  # until the next
    # each split over the manifest's two mirrors (2000 B a node: one request, the first's)
    for f in events:
        assert [m["url"] for m in f["mirrors"]] == ["https://a.example/", "https://b.example/"]
        assert [m["cdn_total"] for m in f["mirrors"]] == [f["cdn_total"], 0]
    # `tracker forecast show` prints every event beside what followed it
    print_forecast(report)
    shown = capsys.readouterr().out
    assert "build 2 on stable, rollout raised 10% -> 50% " in shown, shown
    assert "rollout completed (60% -> 100%)" in shown and shown.count("CDN egress so far") == 3
    assert "  mirror https://b.example/: 0 B (0%)" in shown
    # build 3 on beta (no node there yet), then promoted to stable's fleet of NODES
    three = build(publisher, 3, [1, 2, 5, 7], clock.now, channel="beta")
    clock.now += 60
    assert (await client.publish(APP, "beta", three.encode()))["forecast"]["nodes"] == 0
    clock.now += 60
    await client.promote(APP, "stable", three.id)
    report = (await http.get(f"/v1/apps/{APP}/builds/3/forecast")).json()
    got = [(e["forecast"]["event"], e["forecast"]["channel"]) for e in report["events"]]
    assert got == [("publish", "beta"), ("promote", "stable")]
    promoted = report["events"][1]["forecast"]
    assert promoted["nodes"] == NODES and promoted["need_bytes"] == 2 * CHUNK
    # the load view lists every event, newest first
    load = (await http.get(f"/v1/apps/{APP}/load")).json()
    assert [(f["build"], f["event"]) for f in load["forecasts"]] == [
        (3, "promote"), (3, "publish"), (2, "rollout-complete"), (2, "rollout-raise"),
        (2, "publish"), (1, "publish"),
    ]  # fmt: skip
    await http.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
async def test_nodes_joining_the_fleet_add_whole_builds_to_the_forecast(
    backend: str,
    make_tracker: Callable[..., Tracker],
    publisher: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    clock, t, client = await clocked_tracker(backend, make_tracker, publisher, monkeypatch, request)
    nodes = [keys.generate_key() for _ in range(NODES)]
    one = build(publisher, 1, [1, 2, 3, 4], clock.now)
    await client.publish(APP, "stable", one.encode())
    await adopt(t, client, clock, nodes, one, 4 * CHUNK, 0)  # first seen done: no joins
    clock.now = clock.now // 3600 * 3600 + 3600
    await t.fleet.store.gc(clock.now)  # the fleet's hourly sample
    for _hour in range(2):  # then 3 new nodes an hour, first seen downloading
        for _ in range(3):
            await client.announce(
                keys.generate_key(), app=APP, manifest_id=one.id, port=0, size=4 * CHUNK,
                left=4 * CHUNK, numwant=0,
            )  # fmt: skip
        clock.now += 3600
        await t.fleet.store.gc(clock.now)
    view = (await client._http.get(f"/v1/apps/{APP}/fleet")).json()
    assert [n for _, n in view["joined"]][-3:] == [3, 6, 6], view["joined"]
    two = build(publisher, 2, [1, 2, 5, 6], clock.now)
    f = (await client.publish(APP, "stable", two.encode()))["forecast"]
    # 6 in 2 hours, times the channel's share of the app's nodes (the joiners still updating)
    share = NODES / (NODES + 6)
    assert f["join_rate_per_hour"] == pytest.approx(3 * share, rel=1e-3)
    assert f["joiners"] == pytest.approx(24 * 3 * share, rel=1e-3)
    assert 0 < f["joiners_cdn_total"] <= f["joiners"] * 4 * CHUNK + 1  # whole builds
    assert f["cdn_total"] > f["joiners_cdn_total"]  # beside the fleet's deltas
    await client._http.aclose()
