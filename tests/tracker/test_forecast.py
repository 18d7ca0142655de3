"""The load forecast's model (tracker.forecast): no server, no store."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.release import manifest as M
from p2pnode.release.patchmeta import Patch
from tracker.forecast import (
    BINS,
    CHUNKS_ONLY_MODEL,
    CONNECTIONS,
    DEFAULT_TAU_MIN,
    HORIZON_MIN,
    JOIN_WINDOW_S,
    REQUEST,
    PastRelease,
    bytes_needed,
    compare,
    join_rate,
    mirror_shares,
    mirror_split,
    predict,
)

T0 = 1_800_000_000.0 // 60 * 60
DAY = 86400


def cid(i: int) -> bytes:
    return i.to_bytes(32, "big")


def manifest(
    build: int, chunks: list[tuple[int, int]], patches: tuple[Patch, ...] = ()
) -> M.Manifest:
    refs, off = [], 0
    for i, n in chunks:
        refs.append(M.ChunkRef(cid(i), off, n))
        off += n
    return M.Manifest(
        app="game",
        version=f"1.{build}",
        build=build,
        channel="stable",
        created=0,
        expires=10,
        key=b"k" * 32,
        files=(M.FileEntry("data.bin", off, M.MODE_FILE, tuple(refs)),),
        patches=patches,
    )


def test_need_is_the_new_chunks_each_build_lacks_averaged_over_its_nodes() -> None:
    one = manifest(1, [(1, 100), (2, 100), (3, 100)])
    two = manifest(2, [(1, 100), (2, 100), (4, 50), (4, 50)])  # a chunk twice is fetched once
    three = manifest(3, [(1, 100), (5, 100), (6, 100), (7, 100)])
    out = bytes_needed(three, [(one, 3), (two, 1), (None, 1)])
    assert out["size"] == 400
    assert [b["need"] for b in out["per_build"]] == [300, 300, 400]
    assert out["need"] == (300 * 3 + 300 + 400) / 5
    assert bytes_needed(three, [])["need"] == 400  # nobody runs anything: the whole build


def test_a_listed_patch_replaces_the_chunks_it_makes_from_that_build() -> None:
    one = manifest(1, [(1, 100), (2, 100)])
    patch = Patch(one.id, "data.bin", 1, 2, ((cid(2), 100),), 0, 30, b"p" * 32)
    two = manifest(2, [(1, 100), (5, 100), (6, 100)], patches=(patch,))
    other = manifest(7, [(9, 10)])
    out = bytes_needed(two, [(one, 1), (other, 1)])
    assert [(b["need"], b["patches"]) for b in out["per_build"]] == [(0, 30), (300, 0)]
    assert out["need"] == 150 and out["patch_need"] == 15
    f = predict(nodes=2, need=out["need"], size=300, history=[], published=T0, patch_need=15)
    assert f["patch_need_bytes"] == 15 and f["patches_total"] == 30
    # no history, no offload: the CDN serves every chunk and every patch (nodes count patches
    # in from_cdn, so the series' cdn column is the CDN's whole egress too)
    assert f["cdn_total"] == 330 and f["cdn_patches_total"] == 30
    assert f["cdn_chunks_total"] == 300


def test_a_delta_builds_forecast_is_compared_with_the_cdns_whole_egress() -> None:
    """Chunks and patches on both sides: predicted (the offload model applied to both) and
    actual (the series' cdn, which counts patches fetched from the CDN). A forecast made
    before the model counted patches is compared with the series' chunk bytes."""
    h = past(1, T0 - 2 * DAY, [(5, 50, 50), (5, 50, 50)])  # half the bytes from peers
    f = predict(nodes=10, need=20, size=1000, history=[h], published=T0, patch_need=80)
    assert f["cdn_total"] == 500 and f["cdn_patches_total"] == 400
    assert f["cdn_chunks_total"] == 100 and f["patches_total"] == 800
    rows = [{"t": int(T0), "cdn": 450, "completed": 10, "peers": 450, "patches": 800,
             "patches_cdn": 380, "patches_peers": 420}]  # fmt: skip
    c = compare(f, rows, T0 + 2 * DAY)
    assert c["cdn_actual_total"] == 450 and c["cdn_patches_actual_total"] == 380
    assert c["patches_actual_total"] == 800 and c["total_ratio"] == round(450 / 500, 4)
    old = {**f, "model": CHUNKS_ONLY_MODEL, "cdn_total": 100}
    c = compare(old, rows, T0 + 2 * DAY)
    assert c["cdn_actual_total"] == 70 and c["actual"] == [[int(T0), 70]]


def past(build: int, published: float, per_min: list[tuple[int, int, int]]) -> PastRelease:
    """per_min: (completed, peers, cdn) for minutes 0, 1, ... after the publish."""
    rows = [
        {"t": int(published) // 60 * 60 + 60 * k, "completed": c, "peers": p, "cdn": d}
        for k, (c, p, d) in enumerate(per_min)
    ]
    return PastRelease(build, published, rows)


def test_history_gives_the_shape_and_the_offload_per_quarter() -> None:
    # 4 adopters over 4 minutes; the first quarter's bytes all from the CDN, then all peers
    h = past(1, T0 - 2 * DAY, [(1, 0, 100), (1, 100, 0), (1, 100, 0), (1, 100, 0)])
    f = predict(nodes=8, need=100, size=100, history=[h], published=T0)
    assert f["basis"] == "history" and f["history_builds"] == [1]
    assert f["offload"] == [0.0, 1.0, 1.0, 1.0]
    # 2 adopters a minute; only the first minute's share is fetched from the CDN
    assert f["curve"] == [[int(T0), 200]]
    assert f["cdn_total"] == 200 and f["peers_total"] == 600
    assert f["cdn_peak_per_min"] == 200 and f["cdn_peak_at"] == T0
    staged = predict(nodes=8, need=100, size=100, history=[h], published=T0, percent=50)
    assert staged["adopters"] == 4 and staged["cdn_total"] == 100


def test_recent_releases_are_used_only_when_no_settled_one_is_there() -> None:
    old = past(1, T0 - 3 * DAY, [(2, 0, 10)])
    fresh = past(2, T0 - 600, [(1, 0, 10), (0, 0, 0), (5, 5, 5)])
    assert predict(nodes=1, need=1, size=1, history=[old, fresh], published=T0)[
        "history_builds"
    ] == [1]
    assert predict(nodes=1, need=1, size=1, history=[fresh], published=T0)["history_builds"] == [2]


def test_without_history_every_byte_is_from_the_cdn_on_an_exponential_curve() -> None:
    f = predict(nodes=100, need=1000, size=1000, history=[], published=T0)
    assert f["basis"] == "default" and f["offload"] == [0.0] * BINS
    assert f["cdn_total"] == 100_000 and f["peers_total"] == 0
    first = 100_000 * (1 - math.exp(-1 / DEFAULT_TAU_MIN))
    assert f["cdn_peak_per_min"] == round(first) and f["cdn_peak_at"] == T0


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.integers(0, 10**6),
    need=st.integers(0, 10**10),
    percent=st.floats(0.01, 100),
    minutes=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 10**9), st.integers(0, 10**9)),
        min_size=1,
        max_size=40,
    ),
    age_days=st.integers(0, 6),
)
def test_the_forecast_never_exceeds_what_the_adopters_fetch(
    nodes: int, need: int, percent: float, minutes: list[tuple[int, int, int]], age_days: int
) -> None:
    h = past(1, T0 - age_days * DAY - 60, minutes)
    f = predict(nodes=nodes, need=need, size=need, history=[h], published=T0, percent=percent)
    fetched = nodes * percent / 100 * need
    assert f["cdn_total"] + f["peers_total"] <= fetched * (1 + 1e-9) + 2
    assert f["cdn_total"] + f["peers_total"] >= fetched * (1 - 1e-9) - 2
    assert 0 <= f["cdn_peak_per_min"] <= f["cdn_total"] + 1
    assert sum(b for _, b in f["curve"]) <= f["cdn_total"] + len(f["curve"]) + 1
    assert all(0 <= r <= 1 for r in f["offload"])
    assert all(T0 <= t < T0 + HORIZON_MIN * 60 for t, _ in f["curve"])
    # more nodes never cost less
    more = predict(
        nodes=nodes + 1, need=need, size=need, history=[h], published=T0, percent=percent
    )
    assert more["cdn_total"] >= f["cdn_total"] - 1


def test_compare_puts_what_followed_beside_the_forecast() -> None:
    f = predict(nodes=10, need=100, size=100, history=[], published=T0 + 20)
    rows = [
        {"t": int(T0) - 60, "cdn": 999, "completed": 0, "peers": 0},  # before: not this publish
        {"t": int(T0), "cdn": 40, "completed": 1, "peers": 0},
        {"t": int(T0) + 120, "cdn": 70, "completed": 1, "peers": 5, "patches": 9},
    ]
    c = compare(f, rows, T0 + 180)
    assert c["actual"] == [[int(T0), 40], [int(T0) + 120, 70]]
    assert c["cdn_actual_total"] == 110 and c["cdn_actual_peak_per_min"] == 70
    assert c["cdn_actual_peak_at"] == int(T0) + 120 and c["elapsed_s"] == 180
    assert c["patches_actual_total"] == 9
    so_far = sum(b for t, b in f["curve"] if t <= T0 + 180)
    assert c["cdn_predicted_so_far"] == so_far
    assert c["total_ratio"] == round(110 / so_far, 4)
    assert c["peak_ratio"] == round(70 / f["cdn_peak_per_min"], 4)
    late = compare(f, rows, T0 + 2 * DAY)
    assert late["cdn_predicted_so_far"] == f["cdn_total"]
    nothing = compare(predict(nodes=0, need=1, size=1, history=[], published=T0), [], T0)
    assert nothing["total_ratio"] is None and nothing["cdn_actual_peak_at"] is None


def test_compare_stops_at_the_builds_next_event() -> None:
    f = predict(nodes=10, need=100, size=100, history=[], published=T0)
    rows = [
        {"t": int(T0), "cdn": 40, "completed": 1, "peers": 0},
        {"t": int(T0) + 600, "cdn": 70, "completed": 1, "peers": 0},  # after the next event
    ]
    c = compare(f, rows, T0 + 3600, until=T0 + 600)
    assert c["actual"] == [[int(T0), 40]] and c["elapsed_s"] == 599
    assert c["cdn_predicted_so_far"] == sum(b for t, b in f["curve"] if t < T0 + 600)


def test_a_rollout_raise_forecasts_only_the_nodes_it_lets_in() -> None:
    whole = predict(nodes=100, need=1000, size=1000, history=[], published=T0, percent=50)
    raise_ = predict(
        nodes=100, need=1000, size=1000, history=[], published=T0, percent=50, was_percent=10
    )
    assert raise_["adopters"] == 40 and raise_["was_percent"] == 10 and raise_["percent"] == 50
    assert raise_["cdn_total"] == round(whole["cdn_total"] * 40 / 50)
    lowered = predict(
        nodes=100, need=1000, size=1000, history=[], published=T0, percent=10, was_percent=50
    )
    assert lowered["adopters"] == 0 and lowered["cdn_total"] == 0


def test_late_joiners_fetch_the_whole_build_over_the_horizon() -> None:
    # no adopters at all: only joiners, 2 an hour, of a 1000-byte build whose delta is 10
    f = predict(nodes=0, need=10, size=1000, history=[], published=T0, joiners_per_min=2 / 60)
    assert f["joiners"] == 2 * HORIZON_MIN / 60 and f["join_rate_per_hour"] == 2
    assert f["cdn_total"] == f["joiners_cdn_total"] == round(f["joiners"] * 1000)
    assert f["cdn_peak_per_min"] == round(1000 * 2 / 60)
    # with adopters, the joiners add to what they fetch; a half rollout halves both
    both = predict(nodes=10, need=10, size=1000, history=[], published=T0, joiners_per_min=2 / 60)
    assert both["cdn_total"] == 100 + f["cdn_total"]
    half = predict(
        nodes=10, need=10, size=1000, history=[], published=T0, joiners_per_min=2 / 60,
        percent=50,
    )  # fmt: skip
    assert half["joiners"] == f["joiners"] / 2 and half["cdn_total"] == both["cdn_total"] / 2
    # joiners fetch at the offload of the moment: all from peers once the swarm serves all
    h = past(1, T0 - 2 * DAY, [(1, 0, 100), (1, 100, 0), (1, 100, 0), (1, 100, 0)])
    late = predict(nodes=8, need=100, size=100, history=[h], published=T0, joiners_per_min=1)
    assert late["joiners_cdn_total"] == 1 * 100  # the first minute's joiner only


def test_the_join_rate_is_the_fleets_first_seen_rate_over_the_recent_past() -> None:
    now = T0
    hours = [[now - 3600 * k, 100 - 2 * k] for k in range(10, -1, -1)]  # 2 an hour
    assert join_rate(hours, now) == 2 / 60
    assert join_rate(hours[-1:], now) == 0  # one point says nothing
    assert join_rate([[now - 60, 0], [now, 50]], now) == 0  # a minute is too short a span
    old = [[now - JOIN_WINDOW_S - 3600, 0], *hours]  # before the window: not counted
    assert join_rate(old, now) == 2 / 60
    restarted = [[now - 7200, 500], [now - 3600, 0], [now, 6]]  # the count started again
    assert join_rate(restarted, now) == 6 / 120


def test_a_fetch_spreads_its_requests_over_the_first_mirrors_in_turn() -> None:
    assert mirror_shares(10, 3) == [1.0, 0.0, 0.0]  # one request: the first mirror
    assert mirror_shares(3 * REQUEST, 2) == [2 / 3, 1 / 3]
    assert mirror_shares(1000 * REQUEST, 4) == [0.25] * 4
    wide = mirror_shares(1000 * REQUEST, CONNECTIONS + 2)  # beyond the connections: none
    assert wide[:CONNECTIONS] == [1 / CONNECTIONS] * CONNECTIONS and wide[CONNECTIONS:] == [0, 0]
    # a chunk bigger than a request is one request
    assert mirror_shares(2 * 4 * REQUEST, 2, chunk=4 * REQUEST) == [0.5, 0.5]
    assert mirror_shares(0, 1) == [1.0] and mirror_shares(5, 0) == []


def test_the_forecast_splits_cdn_egress_per_mirror() -> None:
    big = manifest(2, [(i, REQUEST) for i in range(10, 14)])  # 4 requests' worth
    old = manifest(1, [(10, REQUEST), (11, REQUEST), (12, REQUEST)])  # lacks one: 1 request
    need = bytes_needed(big, [(old, 3), (None, 1)])
    split, whole = mirror_split(need, 2)
    assert whole == [0.5, 0.5]
    # 3 nodes x 1 request (mirror a), 1 node x 4 requests (2 each): 5 of 7 requests on a
    assert split == [3 / 7 + 4 / 7 * 0.5, 4 / 7 * 0.5]
    f = predict(
        nodes=4, need=need["need"], size=need["size"], history=[], published=T0,
        mirrors=["https://a/", "https://b/"], split=split, whole_split=whole,
        joiners_per_min=1 / 60,
    )  # fmt: skip
    a, b = f["mirrors"]
    assert a["url"] == "https://a/" and b["url"] == "https://b/"
    assert abs(a["cdn_total"] + b["cdn_total"] - f["cdn_total"]) <= 2
    assert a["cdn_total"] > b["cdn_total"] and a["cdn_peak_per_min"] <= f["cdn_peak_per_min"]
    assert abs(a["share"] + b["share"] - 1) < 1e-3
    one = predict(nodes=4, need=1, size=1, history=[], published=T0)
    assert one["mirrors"] == [
        {"url": None, "share": 1.0, "cdn_total": 4, "cdn_peak_per_min": one["cdn_peak_per_min"],
         "cdn_peak_at": T0}
    ]  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    per_build=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 10**9)), max_size=5),
    mirrors=st.integers(1, 12),
    size=st.integers(1, 10**10),
    joiners=st.floats(0, 100),
)
def test_mirror_totals_add_up_to_the_cdn_total(
    per_build: list[tuple[int, int]], mirrors: int, size: int, joiners: float
) -> None:
    need = {
        "size": size,
        "chunk": 2**20,
        "need": sum(n * b for n, b in per_build) / max(1, sum(n for n, _ in per_build)),
        "per_build": [{"nodes": n, "need": b} for n, b in per_build],
    }
    split, whole = mirror_split(need, mirrors)
    assert abs(sum(split) - 1) < 1e-9 and abs(sum(whole) - 1) < 1e-9
    f = predict(
        nodes=sum(n for n, _ in per_build), need=need["need"], size=size, history=[],
        published=T0, mirrors=[f"m{q}" for q in range(mirrors)], split=split,
        whole_split=whole, joiners_per_min=joiners,
    )  # fmt: skip
    slack = mirrors + 1 + 1e-9 * f["cdn_total"]  # rounding, per mirror and in float sums
    assert abs(sum(m["cdn_total"] for m in f["mirrors"]) - f["cdn_total"]) <= slack
    assert all(m["cdn_peak_per_min"] <= f["cdn_peak_per_min"] + 1 for m in f["mirrors"])
