"""Daemons installing one build at once trade its chunks, as ``watch --listen`` leechers do:
each job fetches through its daemon's one node (its identity, its listening port), which serves
what the job stages and tells connected peers of each chunk as it lands."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.node.result import InstallResult
from p2pnode.service.daemon import Running
from p2pnode.service.job import JobState
from p2pnode.service.library import Entry
from tests.service.test_daemon_tracker import publish
from tests.support.daemon import daemon, installed, job, until
from tests.support.e2e import registered_app
from tests.support.release import tree


def results_of(running: Running) -> list[InstallResult]:
    """The install results of the daemon's jobs from now on (what its tracker reports get)."""
    got: list[InstallResult] = []
    ctx = running.daemon.ctx
    before = ctx.on_installed

    def on_installed(entry: Entry, result: InstallResult | None, seconds: float) -> None:
        if result is not None:
            got.append(result)
        before(entry, result, seconds)

    ctx.on_installed = on_installed
    return got


def test_daemons_fetching_one_build_serve_each_other(tmp_path: Path, tracker_url: str) -> None:
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish(src, cdn_root, key, tracker_url, cdn.url, 1)

        async def main() -> None:
            # A seed whose uplink is too thin to feed two daemons quickly, and no CDN: what a
            # daemon does not take from the seed it can only have from the other daemon.
            slow = {"max_upload_rate": 600_000}
            async with daemon(tmp_path / "s0", listen="127.0.0.1:0", table=slow) as seed:
                _, j = seed.service.add("game", str(tmp_path / "seed"), [pub], tracker=tracker_url)
                await installed(seed, j.id)
                cdn.stop()
                async with (
                    daemon(tmp_path / "s1", listen="127.0.0.1:0") as one,
                    daemon(tmp_path / "s2", listen="127.0.0.1:0") as two,
                    trio.open_nursery() as watching,
                ):
                    # Who the seed sees fetching from it: (node id, the port its hello gives).
                    seen: set[tuple[bytes, int]] = set()
                    peers_shown: list[int] = []

                    async def watch() -> None:
                        assert seed.daemon.node is not None
                        while True:
                            seen.update((k.node_id, k.listen_port) for k in seed.daemon.node.links)
                            peers_shown.extend(
                                j.progress.peers for d in (one, two) for j in d.service.queue.jobs
                            )
                            await trio.sleep(0.05)

                    watching.start_soon(watch)
                    got = [results_of(one), results_of(two)]
                    where = [str(tmp_path / "one"), str(tmp_path / "two")]
                    _, a = one.service.add("game", where[0], [pub], tracker=tracker_url)
                    await trio.sleep(0.5)  # (the first has announced itself when the second asks)
                    _, b = two.service.add("game", where[1], [pub], tracker=tracker_url)
                    await installed(one, a.id, timeout=60)
                    await installed(two, b.id, timeout=60)
                    watching.cancel_scope.cancel()
                    ids = []
                    for d, r in zip((one, two), got, strict=True):
                        assert d.daemon.identity is not None and len(r) == 1
                        ids.append(d.daemon.identity.node_id)
                        # The job fetched through its daemon's node: the seed saw the daemon's
                        # identity, with the daemon's own listening port in its hello.
                        assert (d.daemon.identity.node_id, d.listen_port) in seen, seen
                        assert r[0].bytes_peers > 0 and r[0].bytes_cdn == 0
                    # ... and the daemons traded: each job's peers include the other daemon.
                    from_other = [
                        sum(st.bytes for st in r[0].peers.values() if st.node_id == other)
                        for r, other in zip(got, reversed(ids), strict=True)
                    ]
                    assert sum(from_other) > 0, "the daemons fetched everything from the seed"
                    assert one.daemon.node is not None and two.daemon.node is not None
                    assert one.daemon.node.uploaded + two.daemon.node.uploaded > 0
                    # Their progress counted the peers they exchanged with (the seed, the other).
                    assert max(peers_shown) >= 2, peers_shown
                assert tree(tmp_path / "one") == tree(tmp_path / "two") == tree(src)

        trio.run(main)


def test_a_paused_job_stops_its_peer_traffic_and_resumes_from_its_chunks(
    tmp_path: Path, tracker_url: str
) -> None:
    """Pausing a job that fetches from peers through the daemon's node closes its connections
    within a second (the seed sends nothing more); resuming reuses every verified chunk."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish(src, cdn_root, key, tracker_url, cdn.url, 1)

        async def main() -> None:
            slow = {"max_upload_rate": 800_000}
            async with daemon(tmp_path / "s0", listen="127.0.0.1:0", table=slow) as seed:
                _, j = seed.service.add("game", str(tmp_path / "seed"), [pub], tracker=tracker_url)
                await installed(seed, j.id)
                cdn.stop()  # (peers only)
                async with daemon(tmp_path / "s1", listen="127.0.0.1:0") as one:
                    svc, node, served = one.service, one.daemon.node, seed.daemon.node
                    assert node is not None and served is not None
                    _, a = svc.add("game", str(tmp_path / "one"), [pub], tracker=tracker_url)
                    await until(lambda: job(one, a.id).progress.bytes_done > 1_500_000)
                    svc.pause(a.id)
                    await trio.sleep(1.0)
                    assert not [k for k in node.links if k.host is None]  # (none we dialled)
                    sent = served.uploaded
                    await trio.sleep(3.0)
                    assert served.uploaded == sent  # not a byte while paused
                    kept = job(one, a.id).progress.bytes_done
                    assert job(one, a.id).state is JobState.PAUSED and kept > 0
                    svc.resume(a.id)
                    await installed(one, a.id, timeout=60)
                    assert dict(job(one, a.id).progress.by_source)["local"] >= 1_500_000
                assert tree(tmp_path / "one") == tree(src)

        trio.run(main)
