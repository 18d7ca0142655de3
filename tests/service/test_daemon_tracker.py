"""The daemon with a tracker: it follows the channel, reports as ``watch`` does, and serves what
it holds from its one port to another node."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import httpx
import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.service.job import JobKind, JobState
from tests.support.daemon import daemon, installed, until
from tests.support.e2e import ADMIN, cli, registered_app
from tests.support.release import tree


def publish(
    src: Path, out: Path, key: Path, url: str, mirror: str, build: int, *extra: str
) -> None:
    cli(
        *("publish", str(src), "--app", "game", "--version", str(build), "--build", str(build)),
        *("--key", str(key), "--out", str(out), "--tracker", url, "--token", ADMIN),
        *("--mirror", mirror, *extra),
    )


def change(src: Path, seed: int) -> None:
    big = src / "data" / "big.pak"
    big.write_bytes(big.read_bytes()[:1_000_000] + random.Random(seed).randbytes(9999))


def test_daemon_follows_the_channel_reports_and_serves_peers(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish(src, cdn_root, key, tracker_url, cdn.url, 1)
        v1 = tree(src)

        async def main() -> None:
            # Update windows that are shut at the (fixed) local time: automatic updates wait.
            window = {"days": "all", "begin": "03:00", "end": "04:00"}
            table = {"update_window": [window]}
            noon = {"local_now": lambda: datetime(2026, 12, 2, 12, 0)}
            async with daemon(tmp_path / "s1", listen="127.0.0.1:0", table=table, **noon) as one:
                svc = one.service
                _, first = svc.add("game", str(tmp_path / "one"), [pub], tracker=tracker_url)
                await installed(one, first.id)
                assert tree(tmp_path / "one") == v1

                # A publish reaches the queue through the feed as an automatic update, which
                # waits for an update window ...
                change(src, 2)
                publish(src, cdn_root, key, tracker_url, cdn.url, 2)
                await until(lambda: len(svc.queue.jobs) == 2, 20)
                update = svc.queue.jobs[1]
                assert update.kind is JobKind.UPDATE and update.auto and not update.critical
                await trio.sleep(1.5)
                assert update.state is JobState.QUEUED
                # ... until a critical build is published: it takes the update's place and
                # installs at once, window or not.
                change(src, 3)
                publish(src, cdn_root, key, tracker_url, cdn.url, 3, "--type", "critical")
                await installed(one, update.id)
                assert update.critical and len(svc.queue.jobs) == 2
                assert tree(tmp_path / "one") == tree(src)

                # Its outcomes reached the tracker (as watch reports them).
                async def reported() -> int:
                    async with httpx.AsyncClient() as http:
                        r = await http.get(f"{tracker_url}/v1/outcomes", params={"app": "game"})
                    return sum(x.get("success", 0) for x in r.json()["releases"])

                with trio.fail_after(20):
                    while await reported() < 2:
                        await trio.sleep(0.2)

                # Another node, with the CDN down, gets the build from this daemon's port.
                cdn.stop()
                async with daemon(tmp_path / "s2") as two:
                    where = str(tmp_path / "two")
                    _, j = two.service.add("game", where, [pub], tracker=tracker_url)
                    await installed(two, j.id, timeout=60)
                    assert dict(two.service.queue.jobs[0].progress.by_source)["peers"] > 0
                assert tree(tmp_path / "two") == tree(src)

        trio.run(main)


def test_a_staged_rollout_offers_the_daemon_its_own_build(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """The daemon names its node id and installed build to the feed: a rollout raised just far
    enough to hold this node's bucket (not completed) brings it the staged build; below that
    it keeps build 1. A follower that named no node would stay out until the rollout ends."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish(src, cdn_root, key, tracker_url, cdn.url, 1)

        async def main() -> None:
            async with daemon(tmp_path / "s1") as one:
                svc = one.service
                _, first = svc.add("game", str(tmp_path / "one"), [pub], tracker=tracker_url)
                await installed(one, first.id)
                change(src, 2)
                assert one.daemon.identity is not None
                node = one.daemon.identity.node_id
                place = await publish_staged(src, cdn_root, key, tracker_url, cdn.url, node)
                await trio.sleep(1.5)
                if place > 0:  # 0.01% holds bucket 0 only
                    assert len(svc.queue.jobs) == 1, "a node outside the rollout was updated"
                await raise_rollout(tracker_url, place)
                await until(lambda: len(svc.queue.jobs) == 2, 30, "the staged build queued")
                await installed(one, svc.queue.jobs[1].id)
                assert tree(tmp_path / "one") == tree(src)

        trio.run(main)


async def publish_staged(
    src: Path, cdn_root: Path, key: Path, url: str, mirror: str, node: bytes
) -> int:
    """Publish build 2 as a staged rollout to 0.01% of the nodes (bucket 0 only); returns the
    bucket ``node`` falls in for it."""
    from tracker.rollout import bucket

    args = ("publish", str(src), "--app", "game", "--version", "2", "--build", "2",
            "--key", str(key), "--out", str(cdn_root), "--tracker", url,
            "--token", ADMIN, "--mirror", mirror, "--rollout", "0.01")  # fmt: skip
    published = await trio.to_thread.run_sync(lambda: cli(*args))
    return bucket(bytes.fromhex(published["manifest_id"]), node)


async def raise_rollout(url: str, place: int) -> None:
    """Raise the channel's rollout just far enough to hold bucket ``place`` (not completed)."""
    import subprocess
    import sys

    from tracker.rollout import BUCKETS

    percent = min(99.99, (place + 1) * 100 / BUCKETS)
    verb = [sys.executable, "-m", "tracker", "rollout", "game", "stable", "raise",
            str(percent), "--url", url, "--token", ADMIN, "--json"]  # fmt: skip
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(verb, capture_output=True, text=True, timeout=30)
    )
    assert done.returncode == 0, done.stderr


def test_a_manual_update_names_the_daemon_to_a_staged_rollout(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """An update the user queues without a target (the channel's head) names the daemon's node
    id and installed build as the follower does: inside a staged rollout's share it brings the
    staged build, where a nameless ask would get the rollout's previous build (no change)."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish(src, cdn_root, key, tracker_url, cdn.url, 1)

        async def main() -> None:
            async with daemon(tmp_path / "s1") as one:
                svc = one.service
                entry, first = svc.add(
                    "game", str(tmp_path / "one"), [pub], tracker=tracker_url, auto_update=False
                )
                await installed(one, first.id)
                change(src, 2)
                assert one.daemon.identity is not None
                node = one.daemon.identity.node_id
                place = await publish_staged(src, cdn_root, key, tracker_url, cdn.url, node)
                await raise_rollout(tracker_url, place)
                update = svc.submit(entry.id, JobKind.UPDATE)
                await installed(one, update.id)
                assert tree(tmp_path / "one") == tree(src)

        trio.run(main)
