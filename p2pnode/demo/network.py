"""The README's main job: a whole release cycle on loopback, printing what came from where.

A tracker (its own process, as in production) and a real nginx (the CDN) start on loopback. A
sample game is published through the tracker with the CDN as its mirror. Every node runs as a
client's daemon would (``p2pnode watch --listen``, ``watch.py``): an origin seed box follows the
channel taking builds from the CDN; three leechers follow it too, find the seed (and each other)
in the tracker's announce answers and install over the encrypted swarm, serving what they hold.
Build 2 is published: every node hears of it by long-poll within milliseconds and fetches only
the new chunks, the leechers mostly from the seed box. Then one node stops following, verifies
and repairs a flipped byte. Every install is reported to the tracker. Then the clients run as
they do on a player's machine, as daemons driven by the command line (``daemons.py``): a queue,
a pause and resume, a critical update overtaking a queued job, a game from the other daemon's
port. Last, with nginx stopped, the first node rolls back offline. The demo ends with the
dashboard's URL, what the tracker holds for the operator (install outcomes, the fleet view, the
audit log: ``operator.py``), the CDN offload it shows and the daemon's web page URL.
"""

from __future__ import annotations

import math
import random
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

from ..discovery.tracker import TrackerClient
from ..errors import DemoError
from ..node.install import InstallOptions, rollback
from ..node.policy import SourcePolicy
from ..node.render import install_json
from ..node.verify import repaired, verify
from ..node.watch import WatchOptions, watch
from ..release import keys
from ..release.metadata import ReleaseInfo
from ..release.publish import publish
from ..units import format_bytes, format_count
from . import operator
from .cdn import LocalCDN
from .daemons import daemon_demo
from .tracker import LocalTracker

__all__ = ["run_demo"]

APP = "demo-game"


def _make_release(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    launcher = root / "bin" / "launch.sh"
    launcher.write_text("#!/bin/sh\necho 'Starting the demo game'\n")
    launcher.chmod(0o755)
    (root / "README.txt").write_text("A sample release published by `p2pnode demo`.\n")
    for name, size in (
        ("levels.pak", 24 << 20),
        ("textures.pak", 12 << 20),
        ("audio.pak", 6 << 20),
    ):
        (root / "data" / name).write_bytes(rng.randbytes(size))


def _change_one_region(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 3
    data[at : at + 300_000] = random.Random(seed).randbytes(300_000)
    path.write_bytes(bytes(data))


def _forecast_row(report: dict[str, Any]) -> dict[str, Any]:
    """The tracker's CDN forecast for build 2, made at its publish, beside what its nodes then
    reported (``GET .../builds/2/forecast``; docs/operations.md, "Bandwidth and load")."""
    f, actual = report.get("forecast"), report.get("actual")
    if not f or not actual:
        return _row("forecast for build 2", 0, "the tracker made none")
    why = (
        "no earlier release measured: assumes no offload"
        if f["basis"] == "default"
        else "offload as build 1's"
    )
    patches_cdn = f.get("cdn_patches_total", 0)
    note = (
        f"CDN egress predicted {format_bytes(f['cdn_total'])} "
        f"({format_count(f['adopters'], 'node')} x {format_bytes(f['need_bytes'])} of chunks "
        f"+ {format_bytes(f['patch_need_bytes'])} of delta patches; {why}; "
        f"{format_bytes(patches_cdn)} of it patches), actual "
        f"{format_bytes(actual['cdn_actual_total'])} "
        f"({format_bytes(actual.get('cdn_patches_actual_total', 0))} of it patches); "
        f"delta patches predicted {format_bytes(f['patches_total'])} from peers or the CDN, actual "
        f"{format_bytes(actual['patches_actual_total'])}"
    )
    return _row(
        "forecast for build 2 vs what followed", 0, note, {"bytes_cdn": actual["cdn_actual_total"]}
    )


def _row(
    step: str, seconds: float, note: str = "", sources: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A table row; ``sources``: where the bytes came from (an install's JSON form, a watcher's
    ``installed`` event, or part of one)."""
    got = sources or {}
    return {
        "step": step,
        "bytes_peers": got.get("bytes_peers", 0),
        "bytes_cdn": got.get("bytes_cdn", 0),
        "bytes_reused": got.get("bytes_reused", 0),
        "seconds": round(seconds, 2),
        "note": note,
    }


LEECHERS = 3
#: How long the demo waits for the tracker to have counted every install (seconds).
REPORTS_WAIT = 2.0


class _Follower:
    """One demo node: ``p2pnode watch --listen`` in this process, its events in a channel."""

    def __init__(
        self, work: Path, name: str, tracker_url: str, trust: list[bytes], policy: str
    ) -> None:
        self.name = name
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self._send, self._events = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.opts = WatchOptions(
            app=APP,
            channel="stable",
            tracker=tracker_url,
            dest=work / name,
            trusted=trust,
            install=InstallOptions(
                listen="127.0.0.1:0",
                policy=SourcePolicy.parse(policy),
                origin=policy == SourcePolicy.CDN_ONLY,  # the seed box: leechers spare its upload
                tracker=tracker_url,
                identity_dir=work / "ids" / name,  # the demo reports node-1 as itself
            ),
        )

    async def run(self) -> None:
        def emit(event: dict[str, Any]) -> None:
            self._send.send_nowait({**event, "at": time.monotonic()})

        try:
            with self.scope:
                await watch(self.opts, emit)
        finally:
            self.done.set()

    async def next(self, kind: str) -> dict[str, Any]:
        """The node's next event of ``kind``; a failure it reports ends the demo."""
        with trio.fail_after(120):
            async for event in self._events:
                if event["event"] == "error":
                    raise DemoError(f"{self.name}: {event['error']}", fix=event.get("fix"))
                if event["event"] == kind:
                    return event
        raise DemoError(f"{self.name} stopped before its {kind} event")

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def _reports_counted(tracker_url: str, *, builds: int, nodes: int) -> None:
    """Wait (at most ``REPORTS_WAIT``) until the tracker counted ``nodes`` completions of each
    of ``builds`` builds."""
    async with httpx.AsyncClient() as http:
        with trio.move_on_after(REPORTS_WAIT):
            while True:
                stats = (await http.get(tracker_url + "/v1/stats")).json()
                counted = [x["completed"] for x in stats["releases"]]
                if len(counted) == builds and min(counted) >= nodes:
                    return
                await trio.sleep(0.05)


async def _demo(work: Path, say: Any, keep: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    publisher = keys.generate_key()
    trust = [keys.public_key_bytes(publisher)]
    src, cdn_dir = work / "release", work / "cdn"
    dest = work / "node-1"  # the leecher that then goes on through update, repair, rollback
    node_ids = work / "ids"  # each node's identity (its node id): _Follower's identity_dir
    admin = secrets.token_hex(16)
    _make_release(src, 1)
    cdn_dir.mkdir()
    async with AsyncExitStack() as stack:
        tracker_url = stack.enter_context(LocalTracker(work / "tracker", admin))
        cdn = stack.enter_context(LocalCDN(cdn_dir))
        say(f"tracker at {tracker_url}, nginx serving {cdn_dir} at {cdn.url}")
        async with TrackerClient(tracker_url, token=admin) as tracker:
            await tracker.add_app(APP, keys.public_key_bytes(publisher))

            async def publish_build(version: str, build: int) -> float:
                """Publish to the CDN, then the tracker; returns when the tracker was told."""
                t = time.monotonic()
                p = await trio.to_thread.run_sync(
                    lambda: publish(
                        src,
                        app=APP,
                        version=version,
                        build=build,
                        key=publisher,
                        out=cdn_dir,
                        mirrors=[cdn.url],
                    )
                )
                told = time.monotonic()
                await tracker.publish(APP, "stable", p.signed.encode())
                rows.append(
                    _row(
                        f"publish build {build}",
                        time.monotonic() - t,
                        f"{format_bytes(p.manifest.total_size)} via the tracker",
                    )
                )
                return told

            await publish_build("1.0.0", 1)
            nodes = await stack.enter_async_context(trio.open_nursery())

            def follower(name: str, policy: str = "p2p-first") -> _Follower:
                node = _Follower(work, name, tracker_url, trust, policy)
                nodes.start_soon(node.run)
                return node

            # The origin seed box follows the channel and takes builds from the CDN; the three
            # leechers follow it too and find the seed (and each other) through the tracker.
            origin = follower("origin-seed", policy="cdn-only")
            got = await origin.next("installed")
            step, note = "origin seed: install build 1", "CDN; serves from now on"
            rows.append(_row(step, got["seconds"], note, got))
            leechers = [follower(f"node-{k}") for k in range(1, LEECHERS + 1)]
            for node in leechers:
                got = await node.next("installed")
                note = f"{len(got['peers'])} peers via the tracker"
                rows.append(_row(f"{node.name}: install build 1", got["seconds"], note, got))

            # Build 2 changes one region of the largest file; every node hears of it by
            # long-poll and fetches only the new chunks.
            _change_one_region(src / "data" / "levels.pak", 2)
            (src / "data" / "patch-notes.txt").write_text("Build 2: the third level changed.\n")
            published = await publish_build("1.1.0", 2)
            heard = (await leechers[0].next("release"))["at"]
            latency = heard - published
            for node in [origin, *leechers]:
                got = await node.next("installed")
                step = "update to build 2" if node is leechers[0] else f"{node.name}: build 2"
                note = "new chunks only"
                if node is leechers[0]:
                    note = f"heard of it {latency * 1000:.0f} ms after publish; new chunks only"
                rows.append(_row(step, got["seconds"], note, got))
            # A watcher reports each install just after saying so: let the tracker count them
            # all (briefly) before node-1 is stopped, which would cancel its report.
            await _reports_counted(tracker_url, builds=2, nodes=1 + LEECHERS)
            await leechers[0].stop()  # node-1 goes on: verify, repair, rollback

            t = time.monotonic()
            report = await verify(dest)
            rows.append(_row("verify", time.monotonic() - t, "OK" if report.ok else "BAD"))
            victim = dest / "data" / "textures.pak"
            with open(victim, "r+b") as f:
                f.seek(5_000_000)
                b = f.read(1)
                f.seek(5_000_000)
                f.write(bytes([b[0] ^ 0xFF]))
            t = time.monotonic()
            report = await verify(dest, repair=True)
            await operator.report(tracker_url, node_ids / "node-1", repaired(report))
            rows.append(
                _row(
                    "repair a flipped byte",
                    time.monotonic() - t,
                    f"repaired {', '.join(report.repaired)}",
                    {"bytes_cdn": report.bytes_cdn, "bytes_reused": report.bytes_reused},
                )
            )
            async with httpx.AsyncClient() as http:
                stats = (await http.get(tracker_url + "/v1/stats")).json()
                path = f"/v1/apps/{APP}/builds/2/forecast"
                forecast = (await http.get(tracker_url + path)).json()
            rows.append(_forecast_row(forecast))

            registered = {APP}

            async def publish_game(
                game: Path, app: str, build: int, info: ReleaseInfo | None
            ) -> None:
                if app not in registered:
                    await tracker.add_app(app, keys.public_key_bytes(publisher))
                    registered.add(app)
                p = await trio.to_thread.run_sync(
                    lambda: publish(
                        game,
                        app=app,
                        version=f"1.{build}",
                        build=build,
                        key=publisher,
                        out=cdn_dir,
                        mirrors=[cdn.url],
                        info=info,
                    )
                )
                await tracker.publish(app, "stable", p.signed.encode())

            # The clients as daemons; they (and their web page) stay up until the demo ends.
            daemons = await stack.enter_async_context(
                daemon_demo(work, tracker_url, publisher, publish_game, say)
            )
            rows.extend(daemons.rows)
        dashboard = tracker_url + "/dashboard"
        cdn.stop()
        t = time.monotonic()
        r = await rollback(dest, InstallOptions())
        note = "nginx stopped: offline"
        rows.append(_row("rollback to build 1", time.monotonic() - t, note, install_json(r)))
        await operator.report(tracker_url, node_ids / "node-1", r)  # the tracker is still up
        ops = await operator.operations(tracker_url, admin, APP)
        if keep:
            say(f"dashboard: {dashboard} (Ctrl-C to stop the demo network)")
            say(f"daemon A's web page: {daemons.web}")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        release: dict[str, Any] = next((x for x in stats["releases"] if x["build"] == 1), {})
        offload = float(release.get("offload_ratio") or 0.0)
        # Last, with no checkpoint after it: cancelling the nodes' nursery cancels everything
        # inside it, and this code runs inside it.
        nodes.cancel_scope.cancel()
        return {
            "workdir": str(work),
            "steps": rows,
            "tracker": tracker_url,
            "dashboard": dashboard,
            "offload_ratio": offload,
            # completions per build, as the tracker counted them (each node once per build)
            "completed": {str(x["build"]): x["completed"] for x in stats["releases"]},
            "update_notice_ms": round(latency * 1000),
            "forecast": forecast,  # the tracker's at build 2's publish, and what followed
            "operations": ops,  # outcomes, fleet view and audit log, as the tracker holds them
            "daemons": daemons.as_json(),
        }


def run_demo(
    workdir: Path | None = None, *, json_mode: bool = False, keep: bool = False
) -> dict[str, Any]:
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="p2pnode-demo-")) if workdir is None else workdir
    if workdir is not None and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if json_mode else print
    try:
        result = trio.run(_demo, work, say, keep)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    if not json_mode:
        _print_table(result["steps"])
        print(f"dashboard (while the demo ran; --keep keeps it up): {result['dashboard']}")
        for line in operator.summary_lines(result["operations"], APP):
            print(line)
        print(
            f"CDN offload the tracker shows for build 1: {result['offload_ratio']:.0%} "
            "(bytes from peers / all bytes the nodes fetched)"
        )
        d = result["daemons"]
        print(
            f"daemon A's queue after two adds: {d['queue']}; after a pause: {d['paused']}; "
            f"critical update overtook the queued job: {d['critical_overtook']}"
        )
        print(f"daemon A's web page (while the demo ran; --keep keeps it up): {d['web']}")
    return result


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="p2pnode demo: where the bytes came from")
    for col in ("step", "from peers", "from CDN", "reused locally", "seconds", "note"):
        right = col in ("from peers", "from CDN", "reused locally", "seconds")
        table.add_column(col, justify="right" if right else "left")
    for row in rows:
        table.add_row(
            row["step"],
            format_bytes(row["bytes_peers"]),
            format_bytes(row["bytes_cdn"]),
            format_bytes(row["bytes_reused"]),
            f"{row['seconds']:.2f}",
            row["note"],
        )
    Console(width=120).print(table)
