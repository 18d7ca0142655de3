"""The CDN in the swarm's schedule (scheduler.py, "The CDN, in the same schedule"): chunks no
peer has come from the CDN while peers still serve the rest, against a real nginx."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.disk.state import StateDir
from p2pnode.disk.switch import local_chunks
from p2pnode.errors import TransportError
from p2pnode.identity import NodeIdentity
from p2pnode.node.install import InstallOptions, install
from p2pnode.ratelimit import RateLimiter
from p2pnode.release import keys
from p2pnode.release.publish import PublishResult, publish
from p2pnode.swarm import wire as W
from p2pnode.swarm.node import Link, SwarmNode
from tests.support.release import KEY, TRUST, make_release, tree


class TimedSeed(SwarmNode):
    last_answer = 0.0

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        out = await super()._answer(link, req)
        TimedSeed.last_answer = trio.current_time()
        return out


async def two_builds(tmp_path: Path) -> tuple[Path, Path, PublishResult, PublishResult, Path]:
    """Build 1 installed in ``seed``; build 2 changes one region of its big file. Both are
    on the CDN root. Returns (src, cdn root, build 1, build 2, seed dir)."""
    src, cdn_root = tmp_path / "src", tmp_path / "cdn"
    make_release(src, big=12 << 20)
    p1 = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    seed_dir = tmp_path / "seed"
    await install(str(cdn_root / p1.manifest_path), seed_dir, TRUST, InstallOptions())
    big = src / "data" / "big.pak"
    data = bytearray(big.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 300_000] = os.urandom(300_000)
    big.write_bytes(bytes(data))
    p2 = publish(src, app="game", version="2", build=2, key=KEY, out=cdn_root)
    return src, cdn_root, p1, p2, seed_dir


async def test_a_delta_takes_new_chunks_from_the_cdn_while_an_old_build_seeds(
    tmp_path: Path,
) -> None:
    """The only peer holds build 1 and serves slowly (2 MiB/s); build 2's new chunks, which
    no peer has, come from the CDN during the peer transfer, not after it."""
    src, cdn_root, p1, p2, seed_dir = await two_builds(tmp_path)
    new = set(p2.manifest.unique_chunks()) - set(p1.manifest.unique_chunks())
    assert new

    sd = StateDir(seed_dir)
    seed = TimedSeed(
        NodeIdentity(keys.generate_key()),
        local_chunks(sd, sd.load()),
        upload_limiter=RateLimiter(2 << 20, burst=64 << 10),
    )
    seed.offer(p1.manifest)
    first_range: list[float] = []

    async def watch_cdn(log: Path) -> None:
        while not first_range:
            if log.exists() and any(
                line.split("\t")[5] != "-" for line in log.read_text().splitlines()
            ):
                first_range.append(trio.current_time())
            await trio.sleep(0.05)

    with LocalCDN(cdn_root) as cdn:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(seed.serve, "127.0.0.1", 0)
            nursery.start_soon(watch_cdn, cdn.access_log)
            options = InstallOptions(peers=[f"127.0.0.1:{port}"], identity_dir=tmp_path / "id")
            with trio.fail_after(60):
                r = await install(cdn.url + p2.manifest_path, tmp_path / "leech", TRUST, options)
            nursery.cancel_scope.cancel()
    assert tree(tmp_path / "leech") == tree(src)
    sizes = p2.manifest.unique_chunks()
    assert r.bytes_peers >= sum(n for c, n in sizes.items() if c not in new) * 0.9
    assert r.bytes_cdn >= sum(sizes[c] for c in new)
    assert r.bytes_cdn < sum(sizes.values()) * 0.5  # the CDN took what peers lack, not more
    assert first_range and first_range[0] < TimedSeed.last_answer  # during, not after


def plain_seed(seed_dir: Path, p1: PublishResult) -> SwarmNode:
    sd = StateDir(seed_dir)
    seed = SwarmNode(NodeIdentity(keys.generate_key()), local_chunks(sd, sd.load()))
    seed.offer(p1.manifest)
    return seed


async def test_p2p_only_fails_clearly_when_peers_lack_chunks_and_installs_nothing(
    tmp_path: Path,
) -> None:
    _src, cdn_root, p1, p2, seed_dir = await two_builds(tmp_path)
    seed = plain_seed(seed_dir, p1)
    dest = tmp_path / "leech"
    with LocalCDN(cdn_root) as cdn:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(seed.serve, "127.0.0.1", 0)
            options = InstallOptions(
                peers=[f"127.0.0.1:{port}"], identity_dir=tmp_path / "id", policy="p2p-only"
            )
            with pytest.raises(TransportError) as info, trio.fail_after(60):
                await install(cdn.url + p2.manifest_path, dest, TRUST, options)
            nursery.cancel_scope.cancel()
        ranges = [a for a in cdn.log() if a.range != "-"]
    assert "p2p-only" in str(info.value) and "--policy p2p-first" in info.value.fix
    assert not ranges  # not one chunk from the CDN
    assert not (dest / "data").exists()  # nothing half-installed


async def test_p2p_first_with_unreachable_peers_installs_from_the_cdn(tmp_path: Path) -> None:
    src, cdn_root, _p1, p2, _seed_dir = await two_builds(tmp_path)
    with trio.socket.socket() as sock:  # a port where nobody listens
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    with LocalCDN(cdn_root) as cdn:
        options = InstallOptions(peers=[f"127.0.0.1:{dead}"], identity_dir=tmp_path / "id")
        with trio.fail_after(60):
            r = await install(cdn.url + p2.manifest_path, tmp_path / "leech", TRUST, options)
    assert tree(tmp_path / "leech") == tree(src)
    assert r.bytes_peers == 0 and r.bytes_cdn >= sum(p2.manifest.unique_chunks().values())
    assert r.peers[f"127.0.0.1:{dead}"].chunks == 0


async def test_cdn_only_asks_no_peer(tmp_path: Path) -> None:
    src, cdn_root, p1, p2, seed_dir = await two_builds(tmp_path)
    seed = plain_seed(seed_dir, p1)
    with LocalCDN(cdn_root) as cdn:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(seed.serve, "127.0.0.1", 0)
            options = InstallOptions(
                peers=[f"127.0.0.1:{port}"], identity_dir=tmp_path / "id", policy="cdn-only"
            )
            with trio.fail_after(60):
                r = await install(cdn.url + p2.manifest_path, tmp_path / "leech", TRUST, options)
            nursery.cancel_scope.cancel()
    assert tree(tmp_path / "leech") == tree(src)
    assert r.bytes_peers == 0 and seed.uploaded == 0
