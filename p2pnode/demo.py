"""The README's main job: a whole release cycle on loopback, printing what came from where.

A tracker (its own process, as in production) and a real nginx (the CDN) start on loopback. A
sample game is published through the tracker with the CDN as its mirror. An origin seed box
installs it from the CDN and seeds it; three leechers ask the tracker for peers, find the seed
(and each other) in its announce answers, and install over the encrypted swarm, serving what
they hold while they download, with the CDN for anything the swarm cannot give. One of them then
learns of build 2 from the tracker's update feed and updates (only new chunks), verifies,
repairs a flipped byte and, with nginx stopped, rolls back offline. Every install is announced
to the tracker; the demo ends with the dashboard's URL and the CDN offload it shows.
"""

from __future__ import annotations

import random
import secrets
import shutil
import signal
import tempfile
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from . import keys
from .discover import DiscoveryOptions
from .identity import load_or_create
from .install import InstallOptions, InstallResult, install, rollback
from .install import seed as serve_seed
from .localcdn import LocalCDN, free_port
from .localtracker import LocalTracker
from .publish import publish
from .tracker_client import TrackerClient
from .tracking import announce_completed
from .units import format_bytes
from .verify import verify

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


def _row(step: str, r: InstallResult | None, seconds: float, note: str = "") -> dict[str, Any]:
    return {
        "step": step,
        "bytes_peers": r.bytes_peers if r else 0,
        "bytes_cdn": r.bytes_cdn if r else 0,
        "bytes_reused": r.bytes_reused if r else 0,
        "seconds": round(seconds, 2),
        "note": note,
    }


LEECHERS = 3


async def _demo(work: Path, say: Any, keep: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    publisher = keys.generate_key()
    trust = [keys.public_key_bytes(publisher)]
    src, cdn_dir = work / "release", work / "cdn"
    dest = work / "node-1"  # the leecher that then goes on through update, repair, rollback
    node_1 = load_or_create(work / "ids" / "node-1")  # its identity, as peers see it
    ports: dict[str, int] = {}
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
                        None,
                        time.monotonic() - t,
                        f"{format_bytes(p.manifest.total_size)} via the tracker",
                    )
                )
                return told

            async def install_head(step: str, head_seq: int, note: str) -> InstallResult:
                head = await tracker.wait_for_release(APP, "stable", since=head_seq)
                t = time.monotonic()
                data = await tracker.fetch_manifest(head.manifest_id)
                r = await install(
                    f"{tracker_url} ({APP}/stable)",
                    dest,
                    trust,
                    InstallOptions(),
                    manifest_data=data,
                )
                await announce_completed(tracker, node_1, r, ports["node-1"])
                rows.append(_row(step, r, time.monotonic() - t, note))
                return r

            async def swarm_install(name: str, data: bytes) -> None:
                """A leecher: asks the tracker for peers, installs from them (CDN for the rest)
                while serving what it has, and reports where its bytes came from."""
                me = load_or_create(work / "ids" / name)
                port = ports[name] = free_port()
                t = time.monotonic()
                options = InstallOptions(
                    listen=f"127.0.0.1:{port}",
                    tracker=tracker_url,
                    identity_dir=work / "ids" / name,
                )
                r = await install(
                    f"{tracker_url} ({APP}/stable)", work / name, trust, options, manifest_data=data
                )
                await announce_completed(tracker, me, r, port, "127.0.0.1")
                rows.append(
                    _row(
                        f"{name}: install build 1",
                        r,
                        time.monotonic() - t,
                        f"{len(r.peers)} peers from the tracker",
                    )
                )

            await publish_build("1.0.0", 1)
            head = await tracker.latest(APP, "stable")
            assert head is not None
            seq = head.seq
            data1 = await tracker.fetch_manifest(head.manifest_id)
            # The origin seed box installs from the CDN, then seeds; three leechers find it
            # (and each other) through the tracker's announces.
            seed_dir, seed_ids = work / "origin-seed", work / "ids" / "origin-seed"
            t = time.monotonic()
            r = await install(
                f"{tracker_url} ({APP}/stable)",
                seed_dir,
                trust,
                InstallOptions(),
                manifest_data=data1,
            )
            rows.append(_row("origin seed: install build 1", r, time.monotonic() - t, "CDN"))
            seed_nursery = await stack.enter_async_context(trio.open_nursery())
            seed_port = await seed_nursery.start(
                partial(
                    serve_seed,
                    seed_dir,
                    "127.0.0.1:0",
                    seed_ids,
                    discovery=DiscoveryOptions(tracker=tracker_url),
                )
            )
            await announce_completed(tracker, load_or_create(seed_ids), r, seed_port, "127.0.0.1")
            async with trio.open_nursery() as leechers:
                for k in range(1, LEECHERS + 1):
                    leechers.start_soon(swarm_install, f"node-{k}", data1)

            # Build 2 changes one region of the largest file; the node hears of it by long-poll.
            _change_one_region(src / "data" / "levels.pak", 2)
            (src / "data" / "patch-notes.txt").write_text("Build 2: the third level changed.\n")
            async with trio.open_nursery() as nursery:
                heard: dict[str, float] = {}

                async def listen() -> None:
                    await tracker.wait_for_release(APP, "stable", since=seq)
                    heard["at"] = time.monotonic()

                nursery.start_soon(listen)
                await trio.sleep(0.1)
                published = await publish_build("1.1.0", 2)
            latency = heard["at"] - published
            await install_head(
                "update to build 2",
                seq,
                f"heard of it {latency * 1000:.0f} ms after publish; new chunks only",
            )

            t = time.monotonic()
            report = await verify(dest)
            rows.append(_row("verify", None, time.monotonic() - t, "OK" if report.ok else "BAD"))
            victim = dest / "data" / "textures.pak"
            with open(victim, "r+b") as f:
                f.seek(5_000_000)
                b = f.read(1)
                f.seek(5_000_000)
                f.write(bytes([b[0] ^ 0xFF]))
            t = time.monotonic()
            report = await verify(dest, repair=True)
            rows.append(
                {
                    **_row(
                        "repair a flipped byte",
                        None,
                        time.monotonic() - t,
                        f"repaired {', '.join(report.repaired)}",
                    ),
                    "bytes_cdn": report.bytes_cdn,
                    "bytes_reused": report.bytes_reused,
                }
            )
            async with httpx.AsyncClient() as http:
                stats = (await http.get(tracker_url + "/v1/stats")).json()
        dashboard = tracker_url + "/dashboard"
        cdn.stop()
        t = time.monotonic()
        r = await rollback(dest, InstallOptions())
        rows.append(_row("rollback to build 1", r, time.monotonic() - t, "nginx stopped: offline"))
        if keep:
            say(f"dashboard: {dashboard} (Ctrl-C to stop the demo network)")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        release: dict[str, Any] = next((x for x in stats["releases"] if x["build"] == 1), {})
        offload = float(release.get("offload_ratio") or 0.0)
        # Last, with no checkpoint after it: cancelling the seed's nursery cancels everything
        # inside it, and this code runs inside it.
        seed_nursery.cancel_scope.cancel()
        return {
            "workdir": str(work),
            "steps": rows,
            "tracker": tracker_url,
            "dashboard": dashboard,
            "offload_ratio": offload,
            "update_notice_ms": round(latency * 1000),
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
        print(
            f"CDN offload the tracker shows for build 1: {result['offload_ratio']:.0%} "
            "(bytes from peers / all bytes the nodes fetched)"
        )
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
