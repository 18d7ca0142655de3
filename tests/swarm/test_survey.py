"""Asking peers for their bitfields before a fetch (swarm/survey.py): what the patch planner
knows of the swarm."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from p2pnode.disk.stage import LocalChunks
from p2pnode.release.publish import publish
from p2pnode.swarm.node import SwarmNode
from p2pnode.swarm.survey import availability
from tests.support.release import KEY
from tests.support.swarm import node, seeded
from tests.support.tracker import free_port


def test_availability_counts_the_peers_holding_each_piece() -> None:
    ids = [bytes([i]) * 32 for i in range(10)]
    bits = [bytes([0b1010_0000, 0b1000_0000]), bytes([0b1000_0000])]  # (a short one too)
    assert availability(ids, bits) == {ids[0]: 2, ids[2]: 1, ids[8]: 1}
    assert availability(ids, []) == {}


async def test_a_survey_counts_what_each_peer_holds(tmp_path: Path) -> None:
    seed, manifest = await seeded(tmp_path)
    stranger = SwarmNode(node(), LocalChunks())  # offers nothing
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        port2 = await nursery.start(stranger.serve, "127.0.0.1", 0)
        leecher = SwarmNode(node(), LocalChunks())
        peers = [("127.0.0.1", port), ("127.0.0.1", port2), ("127.0.0.1", port)]
        with trio.fail_after(10):
            held = await leecher.survey(manifest, peers)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    unique = manifest.unique_chunks()  # type: ignore[attr-defined]
    assert held == dict.fromkeys(unique, 1)  # the seed, once; the stranger holds nothing
    assert seed.uploaded == 0  # nothing was fetched


async def test_a_survey_is_bounded_and_counts_dead_peers_as_nothing(tmp_path: Path) -> None:
    _seed, manifest = await seeded(tmp_path)
    leecher = SwarmNode(node(), LocalChunks())
    t0 = trio.current_time()
    held = await leecher.survey(manifest, [("127.0.0.1", free_port())], wait=0.5)  # type: ignore[arg-type]
    assert held == {} and trio.current_time() - t0 < 2


async def test_a_holder_of_an_earlier_build_is_not_shown_the_manifest(tmp_path: Path) -> None:
    """A peer shown the manifest would answer the fetch's join at once, as a leecher of this
    build would: the survey leaves it as it found it."""
    seed, _m1 = await seeded(tmp_path)
    src = tmp_path / "src"
    big = src / "data" / "big.pak"
    data = bytearray(big.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 100_000] = os.urandom(100_000)
    big.write_bytes(bytes(data))
    p2 = publish(src, app="game", version="2", build=2, key=KEY, out=tmp_path / "cdn2")
    leecher = SwarmNode(node(), LocalChunks())
    leecher.offer(p2.manifest, p2.signed.encode())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(seed.serve, "127.0.0.1", 0)
        with trio.fail_after(10):
            held = await leecher.survey(p2.manifest, [("127.0.0.1", port)])
        nursery.cancel_scope.cancel()
    assert held == {} and p2.manifest.id not in seed.manifests
