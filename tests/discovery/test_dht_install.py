"""An install whose peers come from the DHT alone: no --peer, no tracker."""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from p2pnode.node.install import InstallOptions, install
from p2pnode.node.seed import seed
from p2pnode.release.publish import publish
from tests.support.dht import free_udp_port
from tests.support.release import KEY, TRUST, make_release, tree


def dht_loop_threads() -> int:
    return sum(t.name == "p2pnode-dht-asyncio" for t in threading.enumerate())


async def test_install_finds_its_seed_through_the_dht_alone(tmp_path: Path) -> None:
    src, cdn_root = tmp_path / "src", tmp_path / "cdn"
    make_release(src, big=8 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=cdn_root)
    manifest = str(cdn_root / p.manifest_path)
    await install(manifest, tmp_path / "seed", TRUST, InstallOptions())
    dht_port = free_udp_port()
    loops_before = dht_loop_threads()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: seed(
                tmp_path / "seed",
                "127.0.0.1:0",
                tmp_path / "seed-id",
                None,
                dht_port=dht_port,
                task_status=task_status,
            )
        )
        options = InstallOptions(
            dht_bootstrap=[f"127.0.0.1:{dht_port}"],
            policy="p2p-only",  # the CDN files are right there: make sure none is used
            identity_dir=tmp_path / "leecher-id",
        )
        with trio.fail_after(30):
            r = await install(manifest, tmp_path / "leecher", TRUST, options)
        nursery.cancel_scope.cancel()
    assert tree(tmp_path / "leecher") == tree(src)
    assert r.bytes_cdn == 0 and r.bytes_peers == sum(p.manifest.unique_chunks().values())
    assert len(r.peers) == 1
    # the DHT's asyncio threads end with the install and the seed (both were cancelled)
    assert dht_loop_threads() == loops_before
