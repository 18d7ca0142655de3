"""Every HTTP fault of issue 3 item 7 ends in a retry or a clear CDNError, never a bad byte.

Each test runs the real fetcher against :class:`tests.faultserver.FaultServer` instances in the
test's nursery. ``deliver`` asserts blake3 itself, so any bad byte that got through would fail
the test whatever else it checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest
import trio

from p2pnode.cdn.fetcher import CDNFetcher, CDNOptions, ChunkRequest, FetchStats
from p2pnode.errors import CDNError
from tests.support.faultserver import Fault, FaultServer, dead_url
from tests.support.release import TestRelease, random_files

FAST = dict(
    connections=3,
    connect_timeout=2.0,
    read_timeout=2.0,
    retry_base=0.01,
    retry_cap=0.05,
    cooldown_base=0.05,
    cooldown_cap=0.2,
    max_attempts=4,
    seed=7,
)


@dataclass
class Outcome:
    stats: FetchStats | None
    got: dict[ChunkRequest, bytes] = field(default_factory=dict)
    error: CDNError | None = None


async def fetch(rel: TestRelease, mirrors: list[str], **opts: object) -> Outcome:
    out = Outcome(None)

    async def deliver(req: ChunkRequest, data: bytes) -> None:
        assert blake3.blake3(data).digest() == req.id, "a bad chunk was delivered"
        assert req not in out.got, "a chunk was delivered twice"
        out.got[req] = bytes(data)  # the fetcher reuses its buffers

    options = CDNOptions(**{**FAST, **opts})  # type: ignore[arg-type]
    fetcher = CDNFetcher(
        app=rel.app, build=rel.build, mirrors=mirrors, file_sizes=rel.file_sizes, options=options
    )
    try:
        out.stats = await fetcher.fetch(rel.requests, deliver)
    except CDNError as exc:
        out.error = exc
        out.stats = fetcher.stats
    return out


@pytest.fixture
def rel(make_release: Callable[..., TestRelease]) -> TestRelease:
    return make_release(random_files(3, {"a.pak": 700_000, "sub/b.pak": 300_000}))


async def servers(nursery: trio.Nursery, root: Path, n: int) -> list[FaultServer]:
    out = []
    for _ in range(n):
        s = FaultServer(root)
        await nursery.start(s.serve)
        out.append(s)
    return out


def assert_complete(out: Outcome, rel: TestRelease) -> FetchStats:
    assert out.error is None, str(out.error)
    assert out.stats is not None
    assert set(out.got) == set(rel.requests)
    assert all(out.got[r] == rel.data_of(r) for r in rel.requests)
    assert out.stats.bytes_delivered == rel.total
    return out.stats


async def test_server_ignoring_range_is_read_once_per_file(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("ignore_range"))
    stats = assert_complete(await fetch(rel, [a.url], initial_budget=256 * 1024), rel)
    assert stats.faults["ignored_range"] == 2  # one whole-file answer per file
    assert all(e.status == 200 for e in a.log)
    assert stats.bytes_received == a.body_bytes_sent() == rel.total


async def test_release_from_a_mirror_ignoring_range_costs_at_most_1_1x(
    make_release: Callable[..., TestRelease], nursery: trio.Nursery
) -> None:
    """Issue 15: a 40 MiB install pulled ~265 MiB from a mirror that answers every range
    with the whole file. Its first answer is enough: each file is then read once, every
    chunk kept as it passes, and the ranges asked before that answer are given back to it."""
    sizes = {"packs/big.pak": 6 << 20, "packs/mid.pak": 2 << 20}
    sizes.update({f"small/{i}.dat": 100_000 + i for i in range(10)})
    rel = make_release(random_files(5, sizes))
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("ignore_range"))
    # Default connections (8) and budget: many ranges of each file would be in flight.
    stats = assert_complete(
        await fetch(rel, [a.url], connections=8, max_range_bytes=512 * 1024), rel
    )
    assert a.body_bytes_sent() <= 1.1 * rel.total
    assert stats.bytes_received <= 1.1 * rel.total
    assert stats.faults["ignored_range"] <= len(sizes) + 8


async def test_mirror_ignoring_range_for_one_file_only(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    """A mirror that ignores Range for one file (a misconfigured location) still serves the
    others by range; the whole-file answer is streamed and nothing is delivered twice."""
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("ignore_range", path="a.pak"))
    stats = assert_complete(await fetch(rel, [a.url], initial_budget=256 * 1024), rel)
    assert stats.bytes_received <= 1.1 * rel.total
    assert any(e.status == 206 for e in a.log)


async def test_mirror_ignoring_range_ranks_below_one_that_honours_it(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("ignore_range"))
    stats = assert_complete(await fetch(rel, [a.url, b.url], connections=1), rel)
    assert stats.per_mirror[a.url].requests == 1
    assert stats.per_mirror[b.url].requests >= 1


async def test_416_everywhere_is_a_clear_error(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("status", status=416, path="a.pak"))
    out = await fetch(rel, [a.url])
    assert out.error is not None
    msg = str(out.error)
    assert "a.pak" in msg and "416" in msg and "fix:" in msg and "\n" not in msg
    # Everything that could be fetched was delivered before the error.
    assert {r for r in rel.requests if r.path == "sub/b.pak"} == set(out.got)
    assert out.stats is not None and out.stats.faults["http_416"] >= 1


async def test_416_on_one_mirror_fails_over(rel: TestRelease, nursery: trio.Nursery) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("status", status=416))
    stats = assert_complete(await fetch(rel, [a.url, b.url]), rel)
    assert stats.faults["http_416"] >= 1


async def test_truncated_body_is_retried(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("truncate", after=20_000, times=2))
    stats = assert_complete(await fetch(rel, [a.url]), rel)
    assert stats.faults["truncated"] == 2
    assert stats.retries >= 2


async def test_short_range_response_is_completed(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("short_range", times=3))
    stats = assert_complete(await fetch(rel, [a.url]), rel)
    assert stats.faults["truncated"] >= 1


async def test_5xx_then_success(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("status", status=503, times=2))
    stats = assert_complete(await fetch(rel, [a.url], connections=1), rel)
    assert stats.faults == {"http_503": 2}


async def test_5xx_forever_gives_up_after_max_attempts(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("status", status=500))
    out = await fetch(rel, [a.url], max_attempts=3)
    assert out.error is not None and "HTTP 500" in str(out.error)
    assert "after 3 attempts" in str(out.error)
    assert out.got == {}


async def test_reset_mid_body_is_retried(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("reset", after=100_000, times=2))
    stats = assert_complete(await fetch(rel, [a.url]), rel)
    assert stats.faults.get("reset", 0) + stats.faults.get("truncated", 0) == 2


async def test_dead_mirror_fails_over(rel: TestRelease, nursery: trio.Nursery) -> None:
    (b,) = await servers(nursery, rel.root, 1)
    dead = dead_url()
    stats = assert_complete(await fetch(rel, [dead, b.url]), rel)
    assert stats.per_mirror[dead].faults["connect"] >= 1
    assert stats.per_mirror[b.url].delivered == rel.total


async def test_only_dead_mirrors_is_a_clear_error(rel: TestRelease) -> None:
    dead = dead_url()
    with trio.fail_after(10):
        out = await fetch(rel, [dead], max_attempts=2)
    assert out.error is not None
    assert "cannot connect" in str(out.error) and dead in str(out.error)


async def test_wrong_size_on_one_mirror_fails_over(rel: TestRelease, nursery: trio.Nursery) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("wrong_size", delta=5))
    stats = assert_complete(await fetch(rel, [a.url, b.url]), rel)
    assert stats.per_mirror[a.url].faults["size_mismatch"] >= 1
    assert stats.per_mirror[a.url].delivered == 0


async def test_file_size_changing_mid_download(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    target = rel.disk_path("a.pak")

    def grow(index: int, path: str) -> None:
        if index == 1:  # after the first request, the publisher overwrites the file
            target.write_bytes(rel.files["a.pak"] + b"more")

    a.on_request = grow
    out = await fetch(rel, [a.url], connections=1, initial_budget=256 * 1024)
    assert out.error is not None
    assert "a.pak" in str(out.error) and "the manifest says" in str(out.error)
    assert out.stats is not None and out.stats.faults["size_mismatch"] >= 1
    assert len(out.got) >= 1  # what came before the change was good, and was delivered


async def test_etag_change_with_same_content_is_harmless(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    (a,) = await servers(nursery, rel.root, 1)

    def touch(index: int, path: str) -> None:
        if index == 1:
            a.etag_salt = "-2"

    a.on_request = touch
    stats = assert_complete(
        await fetch(rel, [a.url], connections=1, initial_budget=256 * 1024), rel
    )
    assert stats.faults["etag_changed"] >= 1


async def test_content_change_mid_download_never_mixes_versions(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    target = rel.disk_path("a.pak")

    def replace(index: int, path: str) -> None:
        if index == 1:  # same size, new bytes, new ETag
            target.write_bytes(random_files(99, {"x": len(rel.files["a.pak"])})["x"])
            a.etag_salt = "-new"

    a.on_request = replace
    out = await fetch(rel, [a.url], connections=1, initial_budget=256 * 1024)
    assert out.error is not None and "blake3" in str(out.error)
    assert out.stats is not None
    assert out.stats.faults["etag_changed"] >= 1 and out.stats.hash_failures >= 1


async def test_drip_feeding_server_is_abandoned(rel: TestRelease, nursery: trio.Nursery) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("drip", drip_bytes=1024, drip_interval=0.02))
    start = trio.current_time()
    stats = assert_complete(
        await fetch(rel, [a.url, b.url], min_speed=200_000, speed_window=0.3), rel
    )
    assert stats.per_mirror[a.url].faults["slow"] >= 1
    assert trio.current_time() - start < 5


async def test_stalled_server_times_out(rel: TestRelease, nursery: trio.Nursery) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("stall", after=1000))
    stats = assert_complete(await fetch(rel, [a.url, b.url], read_timeout=0.3), rel)
    assert stats.per_mirror[a.url].faults["timeout"] >= 1


async def test_corrupt_mirror_is_routed_around(rel: TestRelease, nursery: trio.Nursery) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("corrupt", stride=8192))
    stats = assert_complete(await fetch(rel, [a.url, b.url]), rel)
    assert stats.hash_failures >= 1
    assert stats.per_mirror[a.url].delivered == 0
    assert stats.per_mirror[a.url].hash_failures == stats.hash_failures


async def test_only_corrupt_mirrors_is_a_clear_error_and_nothing_delivered(
    rel: TestRelease, nursery: trio.Nursery
) -> None:
    a, b = await servers(nursery, rel.root, 2)
    a.faults.append(Fault("corrupt", stride=8192))
    b.faults.append(Fault("corrupt", stride=4096))
    out = await fetch(rel, [a.url, b.url])
    assert out.error is not None
    msg = str(out.error)
    assert "blake3" in msg and a.url in msg and b.url in msg
    assert "differ from the signed manifest" in out.error.fix
    assert out.got == {}
    assert out.stats is not None and out.stats.chunks_failed == len(rel.requests)


async def test_cancellation_is_prompt(rel: TestRelease, nursery: trio.Nursery) -> None:
    (a,) = await servers(nursery, rel.root, 1)
    a.faults.append(Fault("drip", drip_bytes=4096, drip_interval=0.01))
    start = trio.current_time()
    with trio.move_on_after(0.3) as scope:
        await fetch(rel, [a.url])
    assert scope.cancelled_caught
    assert trio.current_time() - start < 0.8
