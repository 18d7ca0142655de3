"""Shared helpers for the DHT tests: small in-process swarms on loopback."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery.dht.node import DHTConfig, DHTNode, open_bridge, open_dht_node


def keys(n: int, seed: int = 0) -> list[Ed25519PrivateKey]:
    rng = random.Random(seed)
    return [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(n)]


def cfg(**kw: object) -> DHTConfig:
    return DHTConfig(interface="127.0.0.1", **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def swarm(n: int, bridge_kind: str = "thread", seed: int = 0) -> AsyncIterator[list[DHTNode]]:
    async with open_bridge(bridge_kind) as bridge, contextlib.AsyncExitStack() as stack:
        nodes: list[DHTNode] = []
        boot: list[tuple[str, int]] = []
        for key in keys(n, seed):
            node = await stack.enter_async_context(open_dht_node(key, cfg(bootstrap=boot), bridge))
            nodes.append(node)
            boot = [("127.0.0.1", nodes[0].port)]
        yield nodes


def free_udp_port() -> int:
    """A UDP port on loopback nothing is bound to (for a DHT node the test must name)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
