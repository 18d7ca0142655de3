"""The DHT node: the ``kademlia`` package's wire protocol, run from a trio program.

The layers live in their own modules: ``protocol`` (``DHTProtocol``), ``core`` (``_AioCore``),
``bridge`` (the two bridges), ``config`` (``DHTConfig``, the saved routing table); this module
is the trio face (``DHTNode``, ``open_dht_node``, ``serve_dht``) and re-exports the rest.

Theory of operation
-------------------
Three layers, bottom up:

``DHTProtocol`` (asyncio, a ``KademliaProtocol`` subclass) speaks the package's UDP/msgpack RPCs
(ping, store, find_node, find_value) so that it interoperates with itself and keeps the
package's routing table (k-buckets, replacement caches, splitting). It changes what the package
gets wrong for us:

* every datagram is handled synchronously in ``datagram_received`` (the package spawns a task
  per datagram), after a size check and a per-address token bucket; undecodable datagrams,
  unknown RPCs and arguments of the wrong type or size are dropped without an answer, so a
  flood costs bounded CPU and no memory;
* STORE merges into ``RecordStorage`` (multi-value, verified, bounded: storage.py) instead of
  overwriting, and FIND_VALUE answers with the key's record bundle *and* the closest nodes, so a
  lookup can keep going and collect the announcers stored on every close node;
* replication to newly seen nodes uses the right key (the package hashes an already hashed key)
  and only targets nodes actually admitted to the routing table.

``_AioCore`` (asyncio) drives lookups with the sans-IO ``Lookup`` (lookup.py), announces signed
records at the k nodes closest to the topic's key, and merges lookup results: records from the
network, from local storage, and this node's own freshly signed records (the package's ``get``
returns a node's own stale local copy first; we never do: every source is merged and the latest
expiry per announcer wins). Every record is verified and expiry-checked before it is returned.

``DHTNode`` (trio) is the only thing the rest of p2pnode sees. It reaches the asyncio layers
through a *bridge*: ``TrioAsyncioBridge`` runs the asyncio loop inside trio's thread with
``trio_asyncio`` (``open_loop`` + ``aio_as_trio``); ``ThreadBridge`` runs a plain asyncio loop
in a dedicated thread and hands results back through the trio token. Which one is the default,
and why, is measured in docs/discovery.md. ``serve_dht`` adds the periodic jobs: re-announce
before records expire, refresh the routing table, and save it as JSON (never pickle) so the
next run can bootstrap from it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .bridge import Bridge, T, ThreadBridge, TrioAsyncioBridge, open_bridge
from .config import (
    DHTConfig,
    DHTError,
    DHTStateError,
    load_routing_table,
    parse_hostport,
    save_routing_table,
)
from .core import LookupResult, _AioCore
from .lookup import Contact
from .protocol import DHTProtocol
from .records import PeerRecord, Topic
from .storage import RecordStorage

__all__ = [
    "DHTConfig",
    "DHTError",
    "DHTNode",
    "DHTStateError",
    "LookupResult",
    "ThreadBridge",
    "TrioAsyncioBridge",
    "load_routing_table",
    "open_bridge",
    "open_dht_node",
    "parse_hostport",
    "save_routing_table",
    "serve_dht",
]

log = logging.getLogger(__name__)


@dataclass
class DHTNode:
    """A running DHT node, as seen from trio. Make one with ``open_dht_node``."""

    key: Ed25519PrivateKey
    config: DHTConfig
    bridge: Bridge
    core: _AioCore
    port: int = 0
    last_save_error: str | None = field(default=None, repr=False)

    @property
    def node_id(self) -> bytes:
        return bytes(self.core.node.id)

    @property
    def storage(self) -> RecordStorage:
        """The node's record storage. It lives on the asyncio loop: with the thread bridge,
        read or change it only inside ``on_loop``."""
        return self.core.storage

    @property
    def protocol(self) -> DHTProtocol:
        """The node's protocol (counters, routing table); same rule as ``storage``."""
        return self.core.proto

    async def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the plain function ``fn(*args)`` on the DHT's asyncio loop and return its result:
        the safe way to inspect or change ``storage`` and ``protocol`` from trio."""

        async def run() -> T:
            return fn(*args)

        return await self.bridge.call(run)

    async def _resolve(self, addrs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        out = []
        for host, port in addrs:
            try:
                ipaddress.ip_address(host)
                out.append((host, port))
                continue
            except ValueError:
                pass
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("cannot resolve DHT bootstrap %s: %s", host, exc)
                continue
            out.extend((str(info[4][0]), port) for info in infos[:1])
        return out

    async def bootstrap(self, addrs: Iterable[tuple[str, int]]) -> int:
        """Join the DHT through ``addrs``; returns how many nodes the routing table holds."""
        resolved = await self._resolve(addrs)
        if not resolved:
            return len(await self.contacts())
        return await self.bridge.call(self.core.bootstrap, resolved)

    async def contacts(self) -> list[Contact]:
        return await self.on_loop(self.core.contacts)

    async def announce(self, topic: Topic, host: str, port: int) -> int:
        """Announce that this node serves ``topic`` at ``host:port`` and keep doing so
        (``serve_dht`` re-announces). Returns how many DHT nodes stored the record.

        Raises:
            PeerRecordError: ``host`` is not an IP address or ``port`` is out of range.
        """
        return await self.bridge.call(self.core.announce, topic, host, port)

    async def withdraw(self, topic: Topic) -> None:
        """Stop re-announcing ``topic`` (stored copies expire by themselves)."""
        await self.on_loop(self.core.withdraw, topic)

    async def reannounce(self) -> int:
        return await self.bridge.call(self.core.reannounce_all)

    async def lookup(self, topic: Topic) -> list[PeerRecord]:
        """Verified, unexpired records of the nodes serving ``topic`` (ours included)."""
        return (await self.lookup_detailed(topic)).records

    async def lookup_detailed(self, topic: Topic) -> LookupResult:
        return await self.bridge.call(self.core.lookup, topic)

    async def refresh(self) -> None:
        await self.bridge.call(self.core.refresh)

    async def save_state(self, path: Path | None = None) -> bool:
        """Save the routing table as JSON; returns False (and logs) when it cannot."""
        path = path or self.config.state_path
        if path is None:
            return False
        contacts = await self.contacts()
        if not contacts:
            return False  # keep an older, useful file rather than an empty one
        try:
            await trio.to_thread.run_sync(save_routing_table, path, self.node_id, contacts)
        except OSError as exc:
            self.last_save_error = f"{path}: {exc.strerror}"
            log.warning("cannot save DHT routing table %s: %s", path, exc.strerror)
            return False
        return True

    async def run_maintenance(self) -> None:
        """Re-announce, refresh and save on the configured intervals, forever."""
        cfg = self.config
        next_announce = trio.current_time() + cfg.reannounce_interval
        next_refresh = trio.current_time() + cfg.refresh_interval
        next_save = trio.current_time() + cfg.save_interval
        while True:
            await trio.sleep_until(min(next_announce, next_refresh, next_save))
            now = trio.current_time()
            if now >= next_announce:
                await self.reannounce()
                next_announce = now + cfg.reannounce_interval
            if now >= next_refresh:
                await self.refresh()
                next_refresh = now + cfg.refresh_interval
            if now >= next_save:
                await self.save_state()
                next_save = now + cfg.save_interval


@contextlib.asynccontextmanager
async def open_dht_node(
    key: Ed25519PrivateKey,
    config: DHTConfig,
    bridge: Bridge,
    *,
    storage: RecordStorage | None = None,
) -> AsyncIterator[DHTNode]:
    """Start a DHT node on ``bridge``, bootstrap it from its saved routing table and
    ``config.bootstrap``, and stop it (saving the routing table) on exit.

    Raises:
        DHTError: the UDP port cannot be bound.
    """
    core = _AioCore(key, config, storage or RecordStorage())
    node = DHTNode(key, config, bridge, core)
    node.port = await bridge.call(core.start)
    try:
        seeds = list(config.bootstrap)
        if config.state_path is not None and Path(config.state_path).exists():
            try:
                saved = await trio.to_thread.run_sync(load_routing_table, config.state_path)
            except DHTStateError as exc:
                log.warning("%s", exc)
            else:
                seeds.extend((c.host, c.port) for c in saved)
        if seeds:
            await node.bootstrap(seeds)
        yield node
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await node.save_state()

            async def stop() -> None:
                core.stop()

            await bridge.call(stop)


async def serve_dht(
    key: Ed25519PrivateKey,
    config: DHTConfig,
    bridge: Bridge,
    *,
    task_status: trio.TaskStatus[DHTNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a DHT node with its maintenance jobs until cancelled; ``started(node)`` once it
    listens and has bootstrapped."""
    async with open_dht_node(key, config, bridge) as node:
        task_status.started(node)
        await node.run_maintenance()
