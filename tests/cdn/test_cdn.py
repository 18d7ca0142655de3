"""The CDN fetcher: sans-IO decisions (coalescing, splitting, health, the plan) and real nginx."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import blake3
import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.cdn.drain import DRAIN, Drain
from p2pnode.cdn.fetcher import CDNFetcher, CDNOptions, ChunkRequest, FetchStats
from p2pnode.cdn.plan import (
    DONE,
    FetchPlan,
    Job,
    MirrorHealth,
    PlanParams,
    Wait,
    backoff_delay,
    coalesce,
    parse_content_range,
)
from p2pnode.errors import CDNError
from tests.support.nginx import Nginx
from tests.support.release import TestRelease, random_files

# ---------------------------------------------------------------------------------------------
# sans-IO


def chunks_of(path: str, lengths: list[int]) -> list[ChunkRequest]:
    out, off = [], 0
    for n in lengths:
        out.append(ChunkRequest(blake3.blake3(f"{path}{off}".encode()).digest(), path, off, n))
        off += n
    return out


files_strategy = st.dictionaries(
    st.sampled_from(["a", "b", "c/d"]),
    st.lists(st.integers(1, 50), min_size=1, max_size=30),
    min_size=1,
)


@given(files_strategy, st.data(), st.integers(1, 200))
def test_coalesce_groups_adjacent_chunks_within_the_bound(
    files: dict[str, list[int]], data: st.DataObject, max_bytes: int
) -> None:
    every = [c for path, lengths in files.items() for c in chunks_of(path, lengths)]
    wanted = data.draw(st.lists(st.sampled_from(every), min_size=1))
    runs = coalesce(wanted, max_bytes)
    flat = [c for run in runs for c in run]
    assert sorted(flat, key=repr) == sorted(set(wanted), key=repr)  # each once, none lost
    for run in runs:
        assert len({c.path for c in run}) == 1
        assert all(a.end == b.offset for a, b in itertools.pairwise(run))
        assert len(run) == 1 or sum(c.length for c in run) <= max_bytes
    # Maximal: a run is cut only where the next chunk is not adjacent or would not fit.
    for a, b in itertools.pairwise(runs):
        if a[0].path == b[0].path and a[-1].end == b[0].offset:
            assert sum(c.length for c in a) + b[0].length > max_bytes


class _Pieces(httpx.AsyncByteStream):
    def __init__(self, body: bytes, cuts: list[int]) -> None:
        self._body, self._cuts = body, cuts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pos = 0
        for cut in itertools.cycle(self._cuts):
            if pos >= len(self._body):
                return
            yield self._body[pos : pos + cut]
            pos += cut


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=12),
    st.lists(st.integers(1, 37), min_size=1, max_size=60),
    st.booleans(),
)
def test_bodies_in_any_pieces_are_cut_at_chunk_boundaries_exactly(
    lengths: list[int], cuts: list[int], whole: bool
) -> None:
    """Through a transport without ``readinto`` (any httpx transport; chunked bodies), the
    fetcher copies pieces into chunk buffers: every chunk comes out exact, whatever the piece
    boundaries, from a 206 or from a whole-file 200."""
    data = random.Random(len(lengths)).randbytes(sum(lengths))
    reqs, off = [], 0
    for n in lengths:
        reqs.append(ChunkRequest(blake3.blake3(data[off : off + n]).digest(), "f", off, n))
        off += n

    async def handler(request: httpx.Request) -> httpx.Response:
        first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
        start, end = (0, len(data)) if whole else (int(first), int(last) + 1)
        headers = {"Content-Length": str(end - start)}
        if not whole:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = _Pieces(data[start:end], cuts)
        return httpx.Response(200 if whole else 206, headers=headers, stream=body)

    got: dict[ChunkRequest, bytes] = {}

    async def deliver(req: ChunkRequest, chunk: bytes | memoryview) -> None:
        assert req not in got
        got[req] = bytes(chunk)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            fetcher = CDNFetcher(
                app="a",
                build=1,
                mirrors=["http://cdn.test/"],
                file_sizes={"f": len(data)},
                options=CDNOptions(seed=1, initial_budget=64),
                client=client,
            )
            await fetcher.fetch(reqs, deliver)

    trio.run(main)
    assert got == {r: data[r.offset : r.end] for r in reqs}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-99/1234", (0, 100, 1234)),
        ("bytes 5-5/*", (5, 6, None)),
        ("bytes 10-5/100", None),
        ("bytes 0-100/100", None),
        ("items 0-1/2", None),
        ("bytes x-1/2", None),
        ("", None),
    ],
)
def test_parse_content_range(value: str, expected: object) -> None:
    assert parse_content_range(value) == expected


def test_backoff_is_full_jitter_within_the_cap() -> None:
    rng = random.Random(1)
    samples = [backoff_delay(5, 0.1, 2.0, rng) for _ in range(500)]
    assert min(samples) < 0.2 and 1.7 < max(samples) <= 2.0
    assert all(0 <= backoff_delay(a, 0.1, 2.0, rng) <= min(2.0, 0.1 * 2**a) for a in range(40))


def test_mirror_health_cools_down_and_recovers() -> None:
    h = MirrorHealth(["a", "b", "c"], failure_threshold=2, cooldown_base=1.0, cooldown_cap=8)
    assert h.order(0) == [0, 1, 2]
    h.failure(0, now=0)
    assert h.order(0) == [1, 2, 0]  # one failure: still usable, but ranked last
    h.failure(0, now=0)
    assert h.order(0) == [1, 2]  # cooling down for 0.5..1 s
    assert h.order(1.01) == [1, 2, 0]
    h.failure(0, now=2)
    assert h.order(2.99) == [1, 2]  # the next cooldown is longer (1..2 s)
    h.success(0, 1000, 1.0)
    assert h.order(10) == [0, 1, 2]
    h.failure(2, now=0, immediate=True)  # connection refused: at once
    assert 2 not in h.order(0)
    assert h.order(10) == [0, 1, 2]  # 2 is back, but ranked last until it succeeds
    h.success(2, 0, 0.0)  # a success with no rate sample: equal on speed
    h.started(0)
    assert h.order(10) == [1, 2, 0]  # least loaded first among the healthy
    h.mark_ignores_range(1)
    assert h.order(10) == [2, 0, 1]  # honouring Range beats being idle


def plan_of(reqs: list[ChunkRequest], mirrors: int = 2, **kw: object) -> FetchPlan:
    """A plan whose mirrors have answered before (so they are not held to one request per
    file while the plan learns whether they honour Range)."""
    params = PlanParams(**kw)  # type: ignore[arg-type]
    plan = FetchPlan(reqs, [f"m{i}" for i in range(mirrors)], params, now=0.0, rng=random.Random(1))
    for m in range(mirrors):
        plan.health.mark_answered(m)
    return plan


def test_plan_bounds_bytes_in_flight_by_the_rate_cap() -> None:
    reqs = chunks_of("f", [100_000] * 200)  # 20 MB
    plan = plan_of(
        reqs, connections=8, max_download_rate=1_000_000, target_seconds=0.5, min_budget=1
    )
    jobs = []
    while isinstance(action := plan.next_action(0.0), Job):
        jobs.append(action)
    assert isinstance(action, Wait) and action.until is None
    # 0.5 s at 1 MB/s, whatever the connection count (one chunk of slack).
    assert 500_000 <= sum(j.length for j in jobs) <= 600_000
    # Bytes that arrived but are not verified yet (a half-received chunk) still count.
    plan.job_bytes(jobs[0], jobs[0].length, 0.1)
    assert isinstance(plan.next_action(0.1), Wait)
    for req in jobs[0].chunks:  # room again once its chunks are verified
        plan.chunk_ok(jobs[0], req)
    assert isinstance(plan.next_action(0.1), Job)


def test_plan_grows_ranges_with_the_measured_rate() -> None:
    reqs = chunks_of("f", [65536] * 2000)  # 131 MB
    plan = plan_of(reqs, connections=4, initial_budget=1 << 20, max_range_bytes=16 << 20)
    first = plan.next_action(0.0)
    assert isinstance(first, Job) and first.length <= 1 << 20
    t = 0.0
    for _ in range(20):  # 400 MB/s for a second
        t += 0.05
        plan.job_bytes(first, 20_000_000, t)
    later = plan.next_action(t)
    assert isinstance(later, Job) and later.length > 8 * first.length


def test_plan_fails_over_at_once_but_backs_off_on_the_same_mirror() -> None:
    reqs = chunks_of("f", [1000] * 4)
    plan = plan_of(reqs, mirrors=2, retry_base=1.0, retry_cap=1.0, failure_threshold=5)
    job = plan.next_action(0.0)
    assert isinstance(job, Job) and job.mirror == 0 and len(job.items) == 4
    plan.job_finished(job, 0.0, kind="http_503", detail="HTTP 503")
    again = plan.next_action(0.0)
    assert isinstance(again, Job) and again.mirror == 1  # another mirror takes it at once
    plan.job_finished(again, 0.0, kind="reset", detail="reset")
    wait = plan.next_action(0.0)  # both failed it: wait for a backoff to end
    assert isinstance(wait, Wait) and wait.until is not None and 0 < wait.until <= 1.0
    job3 = plan.next_action(1.0)
    assert isinstance(job3, Job)
    for it in job3.chunks:
        plan.chunk_ok(job3, it)
    plan.job_finished(job3, 1.0)
    assert plan.next_action(1.0) is DONE and plan.retries == 8


def test_plan_hash_failure_excludes_the_mirror_for_that_chunk() -> None:
    reqs = chunks_of("f", [1000] * 2)
    plan = plan_of(reqs, mirrors=2)
    job = plan.next_action(0.0)
    assert isinstance(job, Job)
    plan.chunk_bad(job, reqs[0], 0.0)
    plan.chunk_ok(job, reqs[1])
    plan.job_finished(job, 0.0)
    retry = plan.next_action(0.0)
    assert isinstance(retry, Job) and retry.mirror == 1 and retry.chunks == [reqs[0]]
    plan.chunk_bad(retry, reqs[0], 0.0)
    plan.job_finished(retry, 0.0)
    assert plan.next_action(0.0) is DONE
    assert [it.req for it in plan.failed] == [reqs[0]]
    assert set(plan.reasons(plan.failed[0])) == {"m0", "m1"}


def test_plan_missing_file_on_every_mirror_fails_its_chunks_only() -> None:
    reqs = chunks_of("f", [1000] * 3) + chunks_of("g", [1000])
    plan = plan_of(reqs, mirrors=2, max_range_bytes=1000, connections=1)
    failed: list[ChunkRequest] = []
    done: list[ChunkRequest] = []
    while isinstance(action := plan.next_action(0.0), Job):
        if action.path == "f":
            failed += plan.job_finished(action, 0.0, kind="http_404", detail="HTTP 404")
        else:
            done += [plan.chunk_ok(action, r).req for r in action.chunks]
            plan.job_finished(action, 0.0)
    assert action is DONE
    assert sorted(failed, key=lambda c: c.offset) == reqs[:3] and done == reqs[3:]


def test_plan_delivers_identical_requests_once() -> None:
    reqs = chunks_of("f", [10, 10])
    plan = plan_of(reqs + reqs)
    assert len(plan.items) == 2


# ---------------------------------------------------------------------------------------------
# real nginx


async def fetch_all(
    rel: TestRelease, mirrors: list[str], requests: list[ChunkRequest] | None = None, **kw: object
) -> tuple[FetchStats, dict[ChunkRequest, bytes]]:
    got: dict[ChunkRequest, bytes] = {}

    async def deliver(req: ChunkRequest, data: bytes) -> None:
        assert blake3.blake3(data).digest() == req.id
        assert req not in got
        got[req] = bytes(data)  # the fetcher reuses its buffers

    fetcher = CDNFetcher(
        app=rel.app,
        build=rel.build,
        mirrors=mirrors,
        file_sizes=rel.file_sizes,
        options=CDNOptions(seed=1, **kw),  # type: ignore[arg-type]
    )
    stats = await fetcher.fetch(rel.requests if requests is None else requests, deliver)
    return stats, got


@pytest.fixture
def rel(make_release: Callable[..., TestRelease]) -> TestRelease:
    sizes = {"data/big.pak": 3 << 20, "data/mid.pak": 1 << 20, "bin/run": 5000, "empty2": 1}
    sizes.update({f"small/{i}.txt": 20_000 + i for i in range(6)})
    return make_release(random_files(11, sizes))


async def test_many_chunks_over_several_connections_coalesced(
    rel: TestRelease, nginx: Callable[[Path], Nginx]
) -> None:
    server = nginx(rel.root)
    stats, got = await fetch_all(rel, [server.url], connections=4)
    assert set(got) == set(rel.requests)
    assert all(got[r] == rel.data_of(r) for r in rel.requests)
    assert stats.bytes_received == stats.bytes_delivered == rel.total
    log = server.log()
    assert len(log) == stats.requests
    assert all(line.status == 206 for line in log)
    assert server.body_bytes_sent() == rel.total  # not one byte more than asked
    assert len(rel.requests) >= 60
    assert len(log) <= len(rel.requests) // 4  # coalescing, measured at the server
    assert stats.faults == {} and stats.retries == 0


async def test_a_subset_fetches_exactly_its_bytes(
    rel: TestRelease, nginx: Callable[[Path], Nginx]
) -> None:
    server = nginx(rel.root)
    subset = [r for i, r in enumerate(rel.requests) if i % 5 in (1, 2)]
    stats, got = await fetch_all(rel, [server.url], subset, connections=3)
    assert set(got) == set(subset)
    want = sum(r.length for r in subset)
    assert stats.bytes_received == want == server.body_bytes_sent()
    assert len(server.log()) == len(coalesce(subset, 16 << 20))


async def test_rate_cap_is_roughly_honoured(
    rel: TestRelease, nginx: Callable[[Path], Nginx]
) -> None:
    server = nginx(rel.root)
    rate = 8 << 20
    start = trio.current_time()
    _, got = await fetch_all(rel, [server.url], connections=4, max_download_rate=rate)
    elapsed = trio.current_time() - start
    assert len(got) == len(rel.requests)
    ideal = (rel.total - rate * 0.05) / rate  # the bucket starts with 50 ms of burst
    assert 0.85 * ideal <= elapsed <= 1.6 * ideal + 0.3, (elapsed, ideal)


async def test_bytes_in_flight_follow_the_rate_not_the_connection_count(
    make_release: Callable[..., TestRelease], nginx: Callable[[Path], Nginx]
) -> None:
    rel = make_release(random_files(5, {"a.pak": 8 << 20}))
    server = nginx(rel.root)
    delivered = 0

    async def deliver(req: ChunkRequest, data: bytes) -> None:
        nonlocal delivered
        delivered += len(data)

    rate = 2 << 20
    options = CDNOptions(connections=8, max_download_rate=rate, target_seconds=0.25, seed=1)
    fetcher = CDNFetcher(
        app=rel.app, build=rel.build, mirrors=[server.url], file_sizes=rel.file_sizes,
        options=options,
    )  # fmt: skip
    with trio.move_on_after(0.6):
        await fetcher.fetch(rel.requests, deliver)
    server.stop()  # aborted responses are logged with what nginx really wrote
    pushed = server.body_bytes_sent()
    assert 0 < delivered < rel.total
    # Budget 0.25 s x 2 MiB/s (512 KiB floor), plus a partly received chunk per request.
    assert pushed - delivered <= (512 << 10) + 4 * (256 << 10), (pushed, delivered)


async def test_local_directory_and_file_url_mirrors(rel: TestRelease) -> None:
    for mirror in (str(rel.root), rel.root.as_uri()):
        stats, got = await fetch_all(rel, [mirror], connections=3)
        assert set(got) == set(rel.requests)
        assert all(got[r] == rel.data_of(r) for r in rel.requests)
        assert stats.per_mirror[mirror].delivered == rel.total


async def test_local_and_http_mirrors_share_the_work(
    rel: TestRelease, nginx: Callable[[Path], Nginx]
) -> None:
    server = nginx(rel.root)
    stats, got = await fetch_all(
        rel, [str(rel.root), server.url], connections=4, initial_budget=512 << 10
    )
    assert set(got) == set(rel.requests)
    assert sum(m.delivered for m in stats.per_mirror.values()) == rel.total
    assert all(m.requests > 0 for m in stats.per_mirror.values())


async def test_rerun_after_nginx_stops_and_restarts(
    rel: TestRelease, nginx: Callable[[Path], Nginx]
) -> None:
    server = nginx(rel.root)
    server.stop()
    with pytest.raises(CDNError, match="cannot connect"), trio.fail_after(5):
        await fetch_all(rel, [server.url], max_attempts=2, cooldown_base=0.01, retry_base=0.01)
    server.start()
    _, got = await fetch_all(rel, [server.url])
    assert set(got) == set(rel.requests)


def test_plan_holds_a_new_mirror_to_one_request_per_file_until_it_answers() -> None:
    reqs = chunks_of("f", [100_000] * 40)
    plan = FetchPlan(reqs, ["m0"], PlanParams(connections=8), now=0.0, rng=random.Random(1))
    first = plan.next_action(0.0)
    assert isinstance(first, Job)
    assert plan.next_action(0.0) == Wait(None)  # it may ignore Range: wait for its answer
    plan.answered(first, honoured_range=True)
    assert isinstance(plan.next_action(0.0), Job)


def test_plan_streams_a_whole_file_answer_once_claiming_queued_chunks() -> None:
    reqs = chunks_of("f", [100_000] * 10)
    plan = FetchPlan(reqs, ["m0"], PlanParams(connections=8, initial_budget=200_000), now=0.0)
    job = plan.next_action(0.0)
    assert isinstance(job, Job) and job.start == 0 and job.length < 1_000_000
    plan.answered(job, honoured_range=False)
    assert plan.stream_whole_file(job)
    pos, kept = 0, []
    while (req := plan.next_in_stream(job, pos)) is not None:
        kept.append(req.offset)
        pos = req.end
        plan.chunk_ok(job, req)
    assert kept == [r.offset for r in reqs]  # every chunk from the one body, in order
    assert plan.next_action(0.0) == Wait(None)  # nothing left to ask while it streams
    plan.job_finished(job, 0.1)
    assert plan.next_action(0.1) is DONE


async def test_nginx_ignoring_range_serves_each_file_once(
    rel: TestRelease, nginx: Callable[[Path], Nginx]
) -> None:
    """``max_ranges 0`` makes nginx answer every range with the whole file: issue 15's
    mirror that ignores Range, for real. It costs at most 1.1x the release."""
    server = nginx(rel.root)
    server.stop()
    conf = server.conf.read_text()
    server.conf.write_text(conf.replace("autoindex off;", "autoindex off; max_ranges 0;"))
    server.start()
    stats, got = await fetch_all(rel, [server.url], initial_budget=256 * 1024)
    assert set(got) == set(rel.requests)
    log = server.log()
    assert log and all(line.status == 200 for line in log)
    assert server.body_bytes_sent() <= 1.1 * rel.total
    assert stats.bytes_received <= 1.1 * rel.total


async def test_a_drain_lets_requests_in_flight_land_and_starts_no_new_one(
    make_release: Callable[..., TestRelease], nginx: Callable[[Path], Nginx]
) -> None:
    rel = make_release(random_files(6, {"a.pak": 8 << 20}))
    server = nginx(rel.root)
    delivered = 0

    async def deliver(req: ChunkRequest, data: bytes) -> None:
        nonlocal delivered
        delivered += len(data)

    options = CDNOptions(connections=4, max_download_rate=1 << 20, seed=1)
    fetcher = CDNFetcher(
        app=rel.app, build=rel.build, mirrors=[server.url], file_sizes=rel.file_sizes,
        options=options,
    )  # fmt: skip
    drain = Drain()

    async def fetch() -> None:
        DRAIN.set(drain)  # as the daemon does in a job's task
        await fetcher.fetch(rel.requests, deliver)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        await trio.sleep(0.6)
        drain.request()
        with trio.fail_after(5):
            await drain.wait_idle()
        requests = fetcher.stats.requests
        await trio.sleep(0.3)
        assert fetcher.stats.requests == requests  # nothing new was asked for
        nursery.cancel_scope.cancel()
    server.stop()
    assert 0 < delivered < rel.total
    assert server.body_bytes_sent() == delivered  # every byte sent landed, none was lost
