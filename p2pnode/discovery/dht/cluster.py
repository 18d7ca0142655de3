"""Many DHT nodes in a few processes on loopback: the harness for DHT tests and benchmarks.

Theory of operation
-------------------
A 50- or 200-node DHT is too many interpreters for a 2-core machine, and too few processes
would not test the network path. So each *host process*
(``python -m p2pnode.discovery.dht.cluster``)
runs several real DHT nodes, each on its own UDP port with its own key, all sharing one bridge.
Killing a host process kills its nodes the hard way (no goodbye), which is what churn is.

The host is driven by JSON lines on stdin and answers with JSON lines on stdout; requests carry
an ``id`` echoed in the answer, and are served concurrently, so the harness can keep many
lookups in flight across hosts. The first line a host prints describes its nodes.

Requests (``node`` is the index of a node inside the host; topics are ``m:<hex manifest id>``
or ``a:<app>``)::

    {"id": 1, "op": "announce", "node": 0, "topic": "m:ab12..", "port": 7000}
    {"id": 2, "op": "lookup", "node": 3, "topic": "m:ab12.."}
    {"id": 3, "op": "refresh"}
    {"id": 4, "op": "stats"}
    {"id": 5, "op": "exit"}

``ClusterProcess`` is the trio client for one host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...errors import P2PNodeError, TransportError
from ...release.keys import public_key_bytes
from .node import DHTConfig, DHTNode, open_bridge, open_dht_node, parse_hostport
from .records import Topic

__all__ = ["ClusterProcess", "parse_topic", "topic_text"]

MAX_LINE = 1024 * 1024


def parse_topic(text: str) -> Topic:
    kind, _, ident = text.partition(":")
    if kind == "m":
        return Topic.manifest(bytes.fromhex(ident))
    if kind == "a":
        return Topic.app(ident)
    raise TransportError(f"bad topic {text!r} in a cluster request")


def topic_text(topic: Topic) -> str:
    if topic.kind == b"m":
        return "m:" + topic.ident.hex()
    return "a:" + topic.ident.decode()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buf = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            yield line
        if len(buf) > MAX_LINE:
            raise TransportError("cluster peer sent an over-long line")


# -- the host process -----------------------------------------------------------------------


async def _serve_requests(nodes: list[DHTNode], out: trio.lowlevel.FdStream) -> None:
    lock = trio.Lock()

    async def reply(obj: dict[str, Any]) -> None:
        async with lock:
            await out.send_all(json.dumps(obj).encode() + b"\n")

    async def handle(req: dict[str, Any]) -> None:
        ans: dict[str, Any] = {"id": req.get("id")}
        try:
            await dispatch(req, ans)
        except (KeyError, IndexError, TypeError, ValueError, P2PNodeError) as exc:
            ans["error"] = f"{type(exc).__name__}: {exc}"  # a bad request, answered not fatal
        await reply(ans)

    async def dispatch(req: dict[str, Any], ans: dict[str, Any]) -> None:
        op = req.get("op")
        if op == "announce":
            node = nodes[req["node"]]
            ans["stored"] = await node.announce(parse_topic(req["topic"]), "127.0.0.1", req["port"])
        elif op == "lookup":
            res = await nodes[req["node"]].lookup_detailed(parse_topic(req["topic"]))
            ans.update(
                pubs=[r.public_key.hex() for r in res.records],
                seconds=res.seconds,
                queries=res.queries,
                answers=res.answers,
                failures=res.failures,
            )
        elif op == "refresh":
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.refresh)
        elif op == "stats":
            ans.update(
                contacts=[len(await n.contacts()) for n in nodes],
                records=[await n.on_loop(len, n.storage) for n in nodes],
                rejected=[n.storage.rejected for n in nodes],  # plain ints: no loop hop
                handled=[n.protocol.requests_handled for n in nodes],
                dropped=[n.protocol.requests_dropped for n in nodes],
                cpu=time.process_time(),
            )
        else:
            ans["error"] = f"unknown op {op!r}"

    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        async for line in _lines(stdin):
            req = json.loads(line)
            if req.get("op") == "exit":
                await reply({"id": req.get("id"), "bye": True})
                nursery.cancel_scope.cancel()
                break
            nursery.start_soon(handle, req)


async def host_main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    keys = [Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for _ in range(args.nodes)]
    out = trio.lowlevel.FdStream(os.dup(1))
    boot = [parse_hostport(b) for b in args.bootstrap]
    async with open_bridge(args.bridge) as bridge, contextlib.AsyncExitStack() as stack:
        nodes: list[DHTNode] = []
        for key in keys:
            cfg = DHTConfig(
                interface="127.0.0.1",
                bootstrap=boot,
                rpc_timeout=args.rpc_timeout,
                stall_timeout=args.stall_timeout,
            )
            node = await stack.enter_async_context(open_dht_node(key, cfg, bridge))
            nodes.append(node)
            if not boot:
                boot = [("127.0.0.1", node.port)]
        hello = {
            "ports": [n.port for n in nodes],
            "pubs": [public_key_bytes(k).hex() for k in keys],
            "bridge": args.bridge,
        }
        await out.send_all(json.dumps(hello).encode() + b"\n")
        await _serve_requests(nodes, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="host several DHT nodes, driven by JSON lines")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--bridge", default="thread")
    p.add_argument("--rpc-timeout", type=float, default=2.0)
    p.add_argument("--stall-timeout", type=float, default=0.5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(host_main, args)


# -- the client -----------------------------------------------------------------------------


class ClusterProcess:
    """One host process, seen from a trio test or benchmark. Start with ``start``."""

    def __init__(self, proc: trio.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.ports: list[int] = hello["ports"]
        self.pubs: list[str] = hello["pubs"]
        self._next_id = 0
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._send_lock = trio.Lock()
        self.alive = True

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        *,
        nodes: int,
        seed: int,
        bootstrap: list[str],
        bridge: str = "thread",
        stall_timeout: float = 0.5,
        rpc_timeout: float = 2.0,
    ) -> ClusterProcess:
        cmd = [
            sys.executable,
            "-m",
            "p2pnode.discovery.dht.cluster",
            f"--nodes={nodes}",
            f"--seed={seed}",
            f"--bridge={bridge}",
            f"--stall-timeout={stall_timeout}",
            f"--rpc-timeout={rpc_timeout}",
            *(f"--bootstrap={b}" for b in bootstrap),
        ]
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        lines = _lines(proc.stdout)
        try:
            first = await lines.__anext__()
        except StopAsyncIteration:
            raise TransportError("cluster host exited before it was ready") from None
        host = cls(proc, json.loads(first))
        nursery.start_soon(host._read_answers, lines)
        return host

    async def _read_answers(self, lines: AsyncIterator[bytes]) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for line in lines:
                ans = json.loads(line)
                waiter = self._waiting.pop(ans.get("id"), None)
                if waiter is not None:
                    waiter[1].append(ans)
                    waiter[0].set()
        self.alive = False
        for event, _ in self._waiting.values():
            event.set()

    async def request(self, op: str, **kw: Any) -> dict[str, Any]:
        if not self.alive or self.proc.stdin is None:
            raise TransportError("cluster host is gone")
        self._next_id += 1
        rid = self._next_id
        event, box = trio.Event(), list[dict[str, Any]]()
        self._waiting[rid] = (event, box)
        async with self._send_lock:
            await self.proc.stdin.send_all(json.dumps({"id": rid, "op": op, **kw}).encode() + b"\n")
        await event.wait()
        if not box:
            raise TransportError("cluster host died during a request")
        if "error" in box[0]:
            raise TransportError(f"cluster host refused {op}: {box[0]['error']}")
        return box[0]

    def kill(self) -> None:
        self.alive = False
        self.proc.kill()

    async def aclose(self) -> None:
        if self.alive:
            with (
                trio.move_on_after(5),
                contextlib.suppress(TransportError, trio.BrokenResourceError),
            ):
                await self.request("exit")
        with trio.move_on_after(5):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


if __name__ == "__main__":
    main()
