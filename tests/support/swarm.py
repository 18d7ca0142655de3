"""Swarm nodes for tests: an identity, a seeded node, and a seed that serves corrupt data."""

from __future__ import annotations

from pathlib import Path

import trio

from p2pnode.disk.state import StateDir
from p2pnode.disk.switch import local_chunks
from p2pnode.identity import NodeIdentity
from p2pnode.node.install import InstallOptions, install
from p2pnode.release import keys
from p2pnode.release.publish import publish
from p2pnode.swarm import wire as W
from p2pnode.swarm.node import Link, SwarmNode
from tests.support.release import KEY, TRUST, make_release


def node() -> NodeIdentity:
    return NodeIdentity(keys.generate_key())


async def seeded(tmp_path: Path) -> tuple[SwarmNode, object]:
    src = tmp_path / "src"
    make_release(src, big=6 << 20)
    p = publish(src, app="game", version="1", build=1, key=KEY, out=tmp_path / "cdn")
    dest = tmp_path / "seed"
    await install(str(tmp_path / "cdn" / p.manifest_path), dest, TRUST, InstallOptions())
    sd = StateDir(dest)
    seed = SwarmNode(node(), local_chunks(sd, sd.load()))
    seed.offer(p.manifest)
    return seed, p.manifest


class CorruptSeed(SwarmNode):
    """Answers every request with bytes that do not match the chunk."""

    async def _answer(self, link: Link, req: W.Request) -> bytes:
        ids = self.offers[req.manifest]
        return link.session.send(
            W.Piece(req.manifest, req.index, req.rid, ids[req.index], b"evil" * 100),
            trio.current_time(),
        )
