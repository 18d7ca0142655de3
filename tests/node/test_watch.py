"""``p2pnode watch``: the long-running node that follows a channel through the swarm."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.node.install import InstallOptions
from p2pnode.node.watch import WatchOptions, watch
from p2pnode.release import keys
from tests.support.e2e import ADMIN, cli, registered_app
from tests.support.release import tree


def _publish(
    src: Path, out: Path, key: Path, url: str, mirror: str, build: int, *extra: str
) -> None:
    cli(
        "publish",
        str(src),
        "--app",
        "game",
        "--version",
        str(build),
        "--build",
        str(build),
        "--key",
        str(key),
        "--out",
        str(out),
        "--tracker",
        url,
        "--token",
        ADMIN,
        "--mirror",
        mirror,
        *extra,
    )


async def _until(
    receive: trio.MemoryReceiveChannel[dict[str, Any]], kind: str, **match: Any
) -> dict[str, Any]:
    """The next event of ``kind`` with ``match``ing fields (others are passed over)."""
    with trio.fail_after(60):
        async for e in receive:
            if e["event"] == kind and all(e.get(k) == v for k, v in match.items()):
                return e
    raise AssertionError("watch ended")


def _in_process(tmp_path: Path, url: str, pub: str, **install: Any) -> WatchOptions:
    """A serving watcher of "game" into tmp_path/node, for ``watch()`` in this process."""
    return WatchOptions(
        app="game",
        channel="stable",
        tracker=url,
        dest=tmp_path / "node",
        trusted=[keys.parse_public_key(pub)],
        install=InstallOptions(listen="127.0.0.1:0", identity_dir=tmp_path / "id", **install),
    )


class Watcher:
    """A ``p2pnode watch --listen`` process, read event by event."""

    def __init__(self, tmp: Path, name: str, url: str, pub: str, *extra: str) -> None:
        env = {**os.environ, "XDG_DATA_HOME": str(tmp / f"home-{name}")}
        self.dest = tmp / name
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pnode",
                "watch",
                "game",
                "--tracker",
                url,
                "--dest",
                str(self.dest),
                "--trust",
                pub,
                "--listen",
                "127.0.0.1:0",
                "--timeout",
                "120",
                "--json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def until(self, kind: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"watcher ended before a {kind!r} event: {err}")
            event: dict[str, Any] = json.loads(line)
            assert event["event"] in ("watching", "release", "installed"), event
            if event["event"] == kind:
                return event

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=15)


def test_watchers_update_through_the_swarm_and_serve_between_builds(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    watchers: list[Watcher] = []
    with LocalCDN(cdn_root) as cdn:
        _publish(src, cdn_root, key, tracker_url, cdn.url, 1)
        try:
            # A seed box: builds from the CDN, leechers spare its upload.
            origin = Watcher(
                tmp_path, "origin", tracker_url, pub, "--policy", "cdn-only", "--origin"
            )
            watchers.append(origin)
            first = origin.until("installed")
            assert first["action"] == "installed" and first["bytes_cdn"] > 0
            # Two more nodes find the first through the tracker and take build 1 from it.
            watchers += [Watcher(tmp_path, f"w{i}", tracker_url, pub) for i in (1, 2)]
            for w in watchers[1:]:
                got = w.until("installed")
                assert got["build"] == 1 and got["listen_port"]
                assert got["bytes_peers"] >= got["bytes_total"] // 2, got
            # Build 2 reaches all of them; each fetches only what changed.
            (src / "data" / "new.pak").write_bytes(os.urandom(1 << 20))
            _publish(src, cdn_root, key, tracker_url, cdn.url, 2)
            for w in watchers:
                assert w.until("release")["build"] == 2
                got = w.until("installed")
                assert got["action"] == "updated" and got["build"] == 2, got
                assert got["bytes_peers"] + got["bytes_cdn"] < (3 << 20), got
                assert tree(w.dest) == tree(src)
            # Between builds they serve: a new node gets all of build 2 from them, none from
            # the CDN.
            out = cli(
                "install",
                "game",
                "--tracker",
                tracker_url,
                "--dest",
                str(tmp_path / "late"),
                "--trust",
                pub,
                "--policy",
                "p2p-only",
            )
            assert out["build"] == 2 and out["bytes_cdn"] == 0 and out["bytes_peers"] > 0
            assert tree(tmp_path / "late") == tree(src)
        finally:
            codes = [w.stop() for w in watchers]
    assert codes == [0] * len(watchers)


async def test_a_failed_install_is_retried_and_a_downgrade_refused(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """The CDN lacks build 2's files at first: the node reports the failure, keeps serving
    build 1, and installs build 2 on a retry once the files are there. A channel rolled back
    by the tracker is refused, and build 2 stays installed and served."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    staging = tmp_path / "staging"
    staging.mkdir()
    with LocalCDN(cdn_root) as cdn:
        await trio.to_thread.run_sync(_publish, src, cdn_root, key, tracker_url, cdn.url, 1)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        until = partial(_until, receive)

        opts = _in_process(tmp_path, tracker_url, pub, discovery_wait=0.5)
        opts.retry_first = 0.3
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, opts, send.send_nowait)
            one = await until("installed", build=1)
            port = one["listen_port"]
            # Build 2 is published, but its files reach the CDN only later.
            (src / "data" / "new.pak").write_bytes(os.urandom(1 << 20))
            await trio.to_thread.run_sync(_publish, src, staging, key, tracker_url, cdn.url, 2)
            failed = await until("error", build=2)
            assert failed["retry_in_s"] == pytest.approx(0.3) and failed["fix"]
            # ... and meanwhile build 1 is still served, on the same port.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            await trio.to_thread.run_sync(
                lambda: shutil.copytree(staging, cdn_root, dirs_exist_ok=True)
            )
            two = await until("installed", build=2)
            assert two["action"] == "updated" and two["listen_port"] == port
            assert tree(tmp_path / "node") == tree(src)
            # The tracker moves the channel back to build 1: refused, build 2 kept.
            async with httpx.AsyncClient() as client:
                resp = await client.post(
                    f"{tracker_url}/v1/apps/game/channels/stable/rollback",
                    json={},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                )
                assert resp.status_code == 200, resp.text
            refused = await until("error", build=1)
            assert refused["retry_in_s"] is None and "rollback" in refused["fix"]
            assert tree(tmp_path / "node") == tree(src)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            # The tracker heard every attempt: build 1 installed; build 2 failed to download
            # (at least once) and then updated from build 1. The refused downgrade is no failure.
            async with httpx.AsyncClient() as client:
                got = (await client.get(f"{tracker_url}/v1/outcomes")).json()["releases"]
            by_build = {r["build"]: r for r in got}
            assert by_build[1]["by_kind"] == {"install": {"success": 1, "failure": 0}}
            two_kinds = by_build[2]["by_kind"]["update"]
            assert two_kinds["success"] == 1 and two_kinds["failure"] >= 1, by_build[2]
            assert set(by_build[2]["failure_codes"]) == {"download_failed"}, by_build[2]
            assert by_build[2]["bytes"]["reused"] > 0
            nursery.cancel_scope.cancel()


async def test_a_long_running_watcher_leaks_no_sockets_or_threads(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """A daemon goes through build after build: each install's swarm node, DHT node (its
    asyncio thread and UDP socket), listener and tracker connections end with it."""
    import threading

    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        opts = _in_process(tmp_path, tracker_url, pub, dht_port=0, policy="cdn-only")

        def resources() -> tuple[int, int]:
            dht = sum(t.name == "p2pnode-dht-asyncio" for t in threading.enumerate())
            return len(os.listdir("/proc/self/fd")), dht

        seen: list[tuple[int, int]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, opts, send.send_nowait)
            for build in range(1, 7):
                (src / "data" / "new.pak").write_bytes(os.urandom(256 << 10))
                await trio.to_thread.run_sync(
                    _publish, src, cdn_root, key, tracker_url, cdn.url, build
                )
                with trio.fail_after(60):
                    async for e in receive:
                        assert e["event"] != "error", e
                        if e["event"] == "installed" and e["build"] == build:
                            break
                await trio.sleep(0.3)  # the report to the tracker goes out after the event
                seen.append(resources())
            nursery.cancel_scope.cancel()
    fds, dht_threads = zip(*seen, strict=True)
    assert set(dht_threads) == {1}, seen  # the serving install's DHT node, and no other
    assert max(fds[2:]) <= fds[1] + 2, seen  # steady after the first update


def test_a_mistyped_address_or_flag_is_refused_at_start(tmp_path: Path) -> None:
    """Command-line mistakes fail the daemon at once with the cause (exit 2), instead of being
    retried with backoff at every publish."""
    base = [sys.executable, "-m", "p2pnode", "watch", "game", "--tracker", "http://127.0.0.1:9"]
    for extra, cause in (
        (["--peer", "10.0.0.5"], "is not HOST:PORT"),
        (["--listen", "0.0.0.0:http"], "is not HOST:PORT"),
        (["--origin"], "--origin is a seed box: it needs --listen"),
    ):
        proc = subprocess.run(
            [*base, "--dest", str(tmp_path / "d"), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, (extra, proc.stderr)
        assert cause in proc.stderr and "fix:" in proc.stderr


async def test_every_watchers_install_of_a_build_is_counted_once(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """The demo's flow: serving watchers install build 1, then build 2. Each install is one
    completion of its build in ``/v1/stats`` with an adoption point, although a serving node's
    own announces say it has nothing left before its completion report arrives."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        await trio.to_thread.run_sync(_publish, src, cdn_root, key, tracker_url, cdn.url, 1)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        names = ("a", "b")
        installed: dict[int, set[str]] = {1: set(), 2: set()}

        async def one(name: str) -> None:
            opts = _in_process(tmp_path / name, tracker_url, pub, discovery_wait=0.5)
            await watch(opts, lambda e: send.send_nowait({**e, "node": name}))

        async def until_all(build: int) -> None:
            with trio.fail_after(60):
                async for e in receive:
                    assert e["event"] != "error", e
                    if e["event"] == "installed" and e["build"] == build:
                        installed[build].add(e["node"])
                        if len(installed[build]) == len(names):
                            return

        async def stats() -> dict[int, dict[str, Any]]:
            async with httpx.AsyncClient() as client:
                got = (await client.get(f"{tracker_url}/v1/stats")).json()["releases"]
            return {r["build"]: r for r in got}

        async with trio.open_nursery() as nursery:
            for name in names:
                (tmp_path / name).mkdir()
                nursery.start_soon(one, name)
            await until_all(1)
            (src / "data" / "new.pak").write_bytes(os.urandom(1 << 20))
            await trio.to_thread.run_sync(_publish, src, cdn_root, key, tracker_url, cdn.url, 2)
            await until_all(2)
            # the completion reports go out after the event; the watchers re-announce meanwhile
            with trio.move_on_after(15):
                while True:
                    by_build = await stats()
                    if all(by_build.get(b, {}).get("completed") == 2 for b in (1, 2)):
                        break
                    await trio.sleep(0.2)
            await trio.sleep(1.5)  # more re-announces and reports: still counted once
            by_build = await stats()
            nursery.cancel_scope.cancel()
    for b in (1, 2):
        assert by_build[b]["completed"] == 2, by_build
        assert sum(n for _, n in by_build[b]["adoption"]) == 2, by_build


async def test_a_staged_rollout_reaches_only_the_watchers_in_it(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """``publish --rollout``: the watchers stay on build 1 until ``tracker rollout raise`` lets
    exactly one of them in (the one whose hash with build 2 is lower); that one updates, the
    other keeps build 1. Both CLIs, the feed's ``node``/``have`` and the watchers' wake-up."""
    from p2pnode.identity import load_or_create
    from tracker.rollout import BUCKETS, bucket

    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    names = ("a", "b")
    with LocalCDN(cdn_root) as cdn:
        await trio.to_thread.run_sync(_publish, src, cdn_root, key, tracker_url, cdn.url, 1)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)

        async def one(name: str) -> None:
            opts = _in_process(tmp_path / name, tracker_url, pub, discovery_wait=0.5)
            await watch(opts, lambda e: send.send_nowait({**e, "node": name}))

        log: list[dict[str, Any]] = []

        async def until(kind: str, **match: Any) -> dict[str, Any]:
            with trio.fail_after(60):
                async for e in receive:
                    assert e["event"] != "error", e
                    log.append(e)
                    if e["event"] == kind and all(e.get(k) == v for k, v in match.items()):
                        return e
            raise AssertionError("watch ended")

        async with trio.open_nursery() as nursery:
            for name in names:
                (tmp_path / name).mkdir()
                nursery.start_soon(one, name)
            on_one: set[str] = set()
            while on_one != set(names):
                on_one.add((await until("installed", build=1))["node"])
            (src / "data" / "new.pak").write_bytes(os.urandom(1 << 20))
            staged = tmp_path / "staged"
            staged.mkdir()
            args = ["publish", str(src), "--app", "game", "--version", "2", "--build", "2",
                    "--key", str(key), "--out", str(staged), "--tracker", tracker_url,
                    "--token", ADMIN, "--mirror", cdn.url, "--rollout", "0.01"]  # fmt: skip
            published = await trio.to_thread.run_sync(lambda: cli(*args))
            assert published["tracker"]["rollout"]["state"] == "active"
            shutil.copytree(staged, cdn_root, dirs_exist_ok=True)
            two = bytes.fromhex(published["manifest_id"])
            ids = {n: load_or_create(tmp_path / n / "id").node_id for n in names}
            places = {n: bucket(two, i) for n, i in ids.items()}
            first, second = sorted(names, key=places.__getitem__)
            assume = places[first] >= 1  # 0.01% holds bucket 0 only: nobody, almost surely
            percent = (places[first] + 1) * 100 / BUCKETS
            if not assume or places[second] < places[first] + 1:
                pytest.skip("the two node ids hash too close together")  # ~1e-4 chance
            verb = [sys.executable, "-m", "tracker", "rollout", "game", "stable", "raise",
                    str(percent), "--url", tracker_url, "--token", ADMIN, "--json"]  # fmt: skip
            before_raise = len(log)
            raised = await trio.to_thread.run_sync(
                lambda: subprocess.run(verb, capture_output=True, text=True, timeout=30)
            )
            assert raised.returncode == 0, raised.stderr
            assert json.loads(raised.stdout)["percent"] == pytest.approx(percent)
            await until("installed", build=2, node=first)
            assert tree(tmp_path / first / "node") == tree(src)
            # the other one heard the raise too (every watcher is woken), and keeps build 1
            heard = [e for e in log[before_raise:] if e["node"] == second]
            if not any(e["event"] == "release" for e in heard):
                heard.append(await until("release", node=second))
            assert {e["build"] for e in heard if e["event"] in ("release", "installed")} == {1}
            assert not (tmp_path / second / "node" / "data" / "new.pak").exists()
            nursery.cancel_scope.cancel()


async def test_release_events_carry_the_type_and_a_build_for_newer_clients_is_not_retried(
    tmp_path: Path,
    tracker_url: str,
) -> None:
    """The watch learns a build's update type from the feed (what a queue orders by); a build
    that needs a newer p2pnode is refused once, reported as client_too_old, fetches nothing,
    and the watch goes on to the next publish."""
    src, cdn_root, key, pub = registered_app(tmp_path, tracker_url)
    with LocalCDN(cdn_root) as cdn:
        publish = partial(_publish, src, cdn_root, key, tracker_url, cdn.url)
        await trio.to_thread.run_sync(publish, 1, "--type", "critical")
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        until = partial(_until, receive)

        opts = _in_process(tmp_path, tracker_url, pub, discovery_wait=0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, opts, send.send_nowait)
            release = await until("release", build=1)
            assert release["update_type"] == "critical" and release["critical"] is True
            assert (await until("installed", build=1))["update_type"] == "critical"
            cdn.clear_log()
            await trio.to_thread.run_sync(publish, 2, "--min-client", "99.0")
            assert (await until("release", build=2))["critical"] is False
            refused = await until("error", build=2)
            assert refused["retry_in_s"] is None and "upgrade p2pnode" in refused["fix"]
            assert "needs p2pnode 99.0 or newer" in refused["error"]
            assert not [x for x in cdn.log() if "/files/" in x.uri]  # not a chunk asked for
            (src / "data" / "new.pak").write_bytes(os.urandom(1 << 16))
            await trio.to_thread.run_sync(publish, 3, "--type", "minor")
            three = await until("installed", build=3)
            assert three["update_type"] == "minor" and three["previous_build"] == 1
            assert tree(tmp_path / "node") == tree(src)
            with trio.fail_after(10):
                while True:  # the failure report runs in the background
                    async with httpx.AsyncClient() as client:
                        got = (await client.get(f"{tracker_url}/v1/outcomes")).json()
                    two = [r for r in got["releases"] if r["build"] == 2]
                    if two:
                        break
                    await trio.sleep(0.05)
            assert set(two[0]["failure_codes"]) == {"client_too_old"}, two
            nursery.cancel_scope.cancel()
