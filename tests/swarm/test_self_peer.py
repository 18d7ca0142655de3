"""A peer that turns out to be this node (its own address handed back by a tracker or the DHT,
or another process sharing its identity) is named as such, not left as an unexplained miss."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2pnode.disk.stage import LocalChunks
from p2pnode.disk.state import StateDir
from p2pnode.disk.switch import local_chunks
from p2pnode.errors import TransportError
from p2pnode.identity import load_or_create
from p2pnode.node.install import InstallOptions, install
from p2pnode.swarm.node import NOT_IN_SWARM, OWN_NODE, PeerStats, SwarmNode, why_no_peer
from tests.support.release import KEY, TRUST, make_release
from tests.support.swarm import node, seeded


async def test_fetching_from_our_own_address_names_it(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    got: list[bytes] = []

    async def deliver(cid: bytes, data: bytes) -> None:
        got.append(cid)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]
        stats: dict[str, PeerStats] = {}
        left = await seed.fetch(manifest, wanted, [("127.0.0.1", port)], deliver, stats)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert left == set(wanted) and got == []
    (st,) = stats.values()
    assert st.error == OWN_NODE and st.node_id == seed.identity.node_id and st.failures == 0
    assert why_no_peer(stats) == f"127.0.0.1:{port}: {OWN_NODE}"


async def test_a_peer_without_the_release_says_so(tmp_path: Path) -> None:
    _seed, manifest = await seeded(tmp_path)
    empty = SwarmNode(node(), LocalChunks())  # serves nothing of this release
    async with trio.open_nursery() as nursery:
        port = await nursery.start(empty.serve, "127.0.0.1", 0)
        stats: dict[str, PeerStats] = {}
        wanted = list(manifest.unique_chunks())  # type: ignore[attr-defined]

        async def deliver(cid: bytes, data: bytes) -> None:
            raise AssertionError("nothing to deliver")

        leecher = SwarmNode(node(), LocalChunks())
        await leecher.fetch(manifest, wanted, [("127.0.0.1", port)], deliver, stats)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    (st,) = stats.values()
    assert st.error == NOT_IN_SWARM


def test_why_no_peer_names_the_failures_first_and_only_a_few() -> None:
    assert why_no_peer({}) == "no peer was found"
    stats = {f"10.0.0.{i}:7000": PeerStats(f"10.0.0.{i}:7000", chunks=i) for i in range(1, 8)}
    stats["10.0.0.7:7000"].error = OWN_NODE
    told = why_no_peer(stats)
    assert told.startswith(f"10.0.0.7:7000: {OWN_NODE}; 10.0.0.1:7000: gave 1 chunks")
    assert told.endswith("; and 2 more")


async def test_an_install_whose_only_peer_is_itself_says_so(tmp_path: Path) -> None:
    """The install's node and the seed share one identity (one identity directory): the
    handshake proves the seed is this node, so p2p-only cannot get anything, and says why."""
    src = tmp_path / "src"
    make_release(src, big=1 << 20)
    from p2pnode.release.publish import publish

    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    location = str(tmp_path / "cdn" / p.manifest_path)
    await install(location, tmp_path / "seed", TRUST, InstallOptions())
    sd = StateDir(tmp_path / "seed")
    seed = SwarmNode(load_or_create(tmp_path / "id"), local_chunks(sd, sd.load()))
    seed.offer(p.manifest)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        options = InstallOptions(
            peers=[f"127.0.0.1:{port}"], identity_dir=tmp_path / "id", policy="p2p-only"
        )
        with pytest.raises(TransportError, match="could not be had from any peer") as info:
            await install(location, tmp_path / "leech", TRUST, options)
        nursery.cancel_scope.cancel()
    assert f"127.0.0.1:{port}: {OWN_NODE}" in str(info.value)
