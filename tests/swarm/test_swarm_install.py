"""Installs through the swarm: separate processes over loopback, CDN fallback, seeds dying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.stage import Journal
from p2pnode.disk.state import StateDir
from p2pnode.disk.switch import local_chunks
from p2pnode.identity import NodeIdentity
from p2pnode.node.install import InstallOptions, install
from p2pnode.release import keys
from p2pnode.release.publish import publish
from p2pnode.swarm import wire as W
from p2pnode.swarm.node import Link, SwarmNode
from tests.support.release import KEY, TRUST, make_release, tree

PUB = keys.format_public_key(keys.public_key_bytes(KEY))


def node_cmd(*args: str, home: Path) -> list[str]:
    return [sys.executable, "-m", "p2pnode", *args]


def env_for(home: Path) -> dict[str, str]:
    # Each process is its own node: its own identity under its own data dir.
    return {**os.environ, "XDG_DATA_HOME": str(home)}


def spawn(*args: str, home: Path) -> subprocess.Popen[str]:
    """``p2pnode *args`` as its own node (data under ``home``), its output piped."""
    return subprocess.Popen(
        node_cmd(*args, home=home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(home),
    )


def start_serving(*args: str, home: Path) -> tuple[subprocess.Popen[str], int]:
    proc = spawn(*args, home=home)
    assert proc.stdout is not None
    line = json.loads(proc.stdout.readline() or "{}")
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, int(line.get("port", 0))


@dataclass
class SeededSwarm:
    """A published release on a local CDN, a seed process serving it, and the processes a
    test starts (stopped at the end)."""

    src: Path
    url: str
    unique: int  # bytes of the release's unique chunks
    cdn: LocalCDN
    seed_port: int
    procs: list[subprocess.Popen[str]]


@contextmanager
def seeded_swarm(tmp_path: Path, *seed_args: str) -> Iterator[SeededSwarm]:
    """``seed_args``: more flags for the seed process (a rate cap, say)."""
    src, cdn_root = tmp_path / "src", tmp_path / "cdn"
    make_release(src, big=16 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    procs: list[subprocess.Popen[str]] = []
    with LocalCDN(cdn_root) as cdn:
        url = cdn.url + p.manifest_path
        seed_dir = tmp_path / "seed"
        trio.run(install, url, seed_dir, [keys.public_key_bytes(KEY)], InstallOptions())
        try:
            cmd = ["seed", "--dest", str(seed_dir), "--listen", "127.0.0.1:0", "--json"]
            cmd += seed_args
            seed, seed_port = start_serving(*cmd, home=tmp_path / "h0")
            procs.append(seed)
            unique = sum(p.manifest.unique_chunks().values())
            yield SeededSwarm(src, url, unique, cdn, seed_port, procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()


def test_processes_fetch_from_a_seed_and_from_each_other(tmp_path: Path) -> None:
    with seeded_swarm(tmp_path) as sw:
        sent_before = sw.cdn.bytes_sent("/game/1/files/")
        # Leecher 1 from the seed, then keeps seeding on its own port.
        l1 = spawn(
            "install",
            sw.url,
            "--dest",
            str(tmp_path / "l1"),
            "--trust",
            PUB,
            "--peer",
            f"127.0.0.1:{sw.seed_port}",
            "--listen",
            "127.0.0.1:0",
            "--seed",
            "--json",
            home=tmp_path / "h1",
        )
        sw.procs.append(l1)
        assert l1.stdout is not None
        first = json.loads(l1.stdout.readline() or "{}")
        assert first.get("event") == "installed", l1.stderr.read() if l1.stderr else ""
        assert first["bytes_peers"] == sw.unique and first["bytes_cdn"] == 0
        l1_port = int(first["listen_port"])
        # Leecher 2 knows only leecher 1.
        out = subprocess.run(
            node_cmd(
                "install",
                sw.url,
                "--dest",
                str(tmp_path / "l2"),
                "--trust",
                PUB,
                "--peer",
                f"127.0.0.1:{l1_port}",
                "--json",
                home=tmp_path / "h2",
            ),
            capture_output=True,
            text=True,
            timeout=120,
            env=env_for(tmp_path / "h2"),
        )
        assert out.returncode == 0, out.stderr
        r2 = json.loads(out.stdout)
        assert r2["bytes_peers"] == sw.unique and r2["bytes_cdn"] == 0
        assert sw.cdn.bytes_sent("/game/1/files/") == sent_before  # no file byte from the CDN
        for d in ("l1", "l2"):
            assert tree(tmp_path / d) == tree(sw.src)


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_a_seed_and_eight_leecher_processes_all_at_once(tmp_path: Path) -> None:
    """Issue 4's done-when: nine processes on loopback, all starting together. Leechers 0-3
    are told of the seed and of every other leecher; leechers 4-7 only of the other leechers,
    so all they get comes from leechers that are downloading too. Each leecher serves while
    it downloads and, with ``--seed``, after; all are stopped once all have installed.
    Byte-identical installs, mostly from peers."""
    # The pool outlives the swarm: a leecher that hangs is stopped first, ending its readline.
    with ThreadPoolExecutor(8) as pool, seeded_swarm(tmp_path) as sw:
        ports = _free_ports(8)
        leechers = []
        for k, port in enumerate(ports):
            others = [q for q in ports if q != port]
            peers = [sw.seed_port, *others] if k < 4 else others
            args = ["install", sw.url, "--dest", str(tmp_path / f"l{k}"), "--trust", PUB]
            args += ["--listen", f"127.0.0.1:{port}", "--seed", "--json"]
            for q in peers:
                args += ["--peer", f"127.0.0.1:{q}"]
            leechers.append(spawn(*args, home=tmp_path / f"h{k + 1}"))
        sw.procs.extend(leechers)
        lines = [pool.submit(first_line, proc) for proc in leechers]
        results = [line.result(timeout=240) for line in lines]
    for k, r in enumerate(results):
        assert r.get("event") == "installed", (k, r)
        assert tree(tmp_path / f"l{k}") == tree(sw.src)
    from_peers = sum(r["bytes_peers"] for r in results)
    from_cdn = sum(r["bytes_cdn"] for r in results)
    assert from_peers + from_cdn == 8 * sw.unique
    assert from_peers > 0.8 * 8 * sw.unique, results  # most bytes from peers
    # Leechers traded among themselves: not everything came from the seed.
    seed_addr = f"127.0.0.1:{sw.seed_port}"
    from_seed = [r["peers"][seed_addr]["bytes"] for r in results[:4]]
    assert sum(from_seed) < from_peers
    for r in results[4:]:  # those told only of leechers had most of theirs from leechers
        assert seed_addr not in r["peers"]
        assert r["bytes_peers"] > 0.5 * sw.unique, r


def first_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The first JSON line a process prints (with ``--seed``: its install's summary), or,
    if it ends first, what it said on stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        return {"exit": proc.wait(), "stderr": proc.stderr.read()}
    return dict(json.loads(line))


def test_killing_the_only_seed_process_mid_transfer_the_cdn_finishes(tmp_path: Path) -> None:
    """Issue 4's done-when: the seed is its own process, capped at 4 MiB/s so the 16 MiB
    release takes seconds; once the leecher has journaled a few of its chunks (all from the
    seed: it holds every chunk and answers in time, so the CDN gets none), the seed is
    SIGKILLed. The install
    completes from the CDN, byte-identical, with bytes from both."""
    with seeded_swarm(tmp_path, "--max-upload-rate", "4M") as sw:
        dest = tmp_path / "leech"
        args = ["install", sw.url, "--dest", str(dest), "--trust", PUB, "--json"]
        args += ["--peer", f"127.0.0.1:{sw.seed_port}", "--mirror", sw.cdn.url]
        leecher = spawn(*args, home=tmp_path / "h1")
        sw.procs.append(leecher)
        seed = sw.procs[0]
        journal = StateDir(dest).journal
        deadline = time.monotonic() + 60
        while len(Journal.read_done(journal)) < 4:  # a few chunks in, of about 17
            assert leecher.poll() is None, leecher.communicate()
            assert time.monotonic() < deadline, "no chunk arrived from the seed"
            time.sleep(0.02)
        seed.kill()  # SIGKILL: no goodbye; the kernel ends its connections
        seed.wait(timeout=10)
        out, err = leecher.communicate(timeout=120)
        assert leecher.returncode == 0, err
        r = json.loads(out)
    assert tree(dest) == tree(sw.src)
    assert r["bytes_peers"] > 0 and r["bytes_cdn"] > 0, r
    assert r["bytes_peers"] + r["bytes_cdn"] >= sw.unique
    seen = r["peers"][f"127.0.0.1:{sw.seed_port}"]
    assert seen["bytes"] == r["bytes_peers"] and seen["failures"] >= 1 and seen["error"], seen


class DyingSeed(SwarmNode):
    """Fault injection: serves a few pieces, then fails every answer as if the connection
    broke (in-process; the test above kills a real seed process)."""

    served = 0

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        DyingSeed.served += 1
        if DyingSeed.served > 6:  # after the first full pipeline went out
            raise trio.BrokenResourceError("the seed died")
        return await super()._answer(link, req)


async def test_a_seed_whose_connections_break_mid_transfer_leaves_the_rest_to_the_cdn(
    tmp_path: Path,
) -> None:
    src, cdn_root = tmp_path / "src", tmp_path / "cdn"
    make_release(src, big=12 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    seed_dir = tmp_path / "seed"
    await install(str(cdn_root / p.manifest_path), seed_dir, TRUST, InstallOptions())
    sd = StateDir(seed_dir)
    seed = DyingSeed(NodeIdentity(keys.generate_key()), local_chunks(sd, sd.load()))
    seed.offer(p.manifest)
    with LocalCDN(cdn_root) as cdn:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(seed.serve, "127.0.0.1", 0)
            options = InstallOptions(peers=[f"127.0.0.1:{port}"], identity_dir=tmp_path / "id")
            r = await install(cdn.url + p.manifest_path, tmp_path / "leech", TRUST, options)
            nursery.cancel_scope.cancel()
    assert tree(tmp_path / "leech") == tree(src)
    assert r.bytes_peers > 0 and r.bytes_cdn > 0
    unique = sum(p.manifest.unique_chunks().values())
    assert r.bytes_peers + r.bytes_cdn <= unique * 1.05 + 65536
