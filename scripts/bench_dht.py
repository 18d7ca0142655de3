#!/usr/bin/env python3
"""Benchmark the DHT: the trio<->asyncio bridge, then lookups against network size with churn.

Part 1 (bridge): a 20-node DHT in a host process; then, for each bridge (``thread`` and
``trio-asyncio``), one node in this process: the round trip of a no-op call through the bridge,
sequential lookups (latency; CPU of this process per lookup, so the asyncio thread is
included), and the same lookups while the trio thread is busy verifying chunks (blake3 of
4 MiB, then a checkpoint, in a loop), as it is during an install.

Part 2 (network): for each size (default 50 and 200 nodes) a loopback DHT in several host
processes (p2pnode.discovery.dht.cluster). Every node announces one topic and a few topics get
several
announcers; then three phases of lookups from random live nodes for random topics:

* ``stable``: everyone up;
* ``killed``: 30% of the nodes killed without warning (whole host processes);
* ``joined``: fresh nodes (20% of the size) join and look up too.

A lookup succeeds when it returns every live announcer of its topic within 2 s. Reported per
phase: success rate, latency median and p99, messages (queries sent) per lookup. The last line
printed is one JSON object with every figure. Bounded: the whole run is under a deadline.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.discovery.dht.cluster import ClusterProcess, parse_topic, percentile, topic_text
from p2pnode.discovery.dht.node import DHTConfig, open_bridge, open_dht_node
from p2pnode.discovery.dht.records import Topic

SUCCESS_SECONDS = 2.0


def summary(latencies: list[float], good: int, total: int, queries: list[int]) -> dict[str, Any]:
    return {
        "lookups": total,
        "success": round(good / total, 4) if total else None,
        "median_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "messages_per_lookup": round(sum(queries) / len(queries), 2) if queries else None,
    }


# -- part 1: bridges ------------------------------------------------------------------------


async def _busy_trio(stop: trio.Event) -> None:
    """What a node's trio thread does during an install: verify chunks, yielding between them."""
    data = bytes(4 * 1024 * 1024)
    while not stop.is_set():
        blake3.blake3(data).digest()
        await trio.sleep(0)


async def bench_bridge_calls(kind: str, calls: int) -> dict[str, Any]:
    """Round trip of a no-op call into the asyncio loop and back."""

    async def noop() -> None:
        return None

    async with open_bridge(kind) as bridge:
        for _ in range(100):
            await bridge.call(noop)
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await bridge.call(noop)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"call_us": round(wall / calls * 1e6, 1), "call_cpu_us": round(cpu / calls * 1e6, 1)}


async def bench_bridge_lookups(
    kind: str, remote: ClusterProcess, topics: list[str], lookups: int, busy: bool, seed: int
) -> dict[str, Any]:
    """One local node (this process, through ``kind``) looking up topics held by a DHT in
    another process: this process's CPU is the local node and its bridge only."""
    rng = random.Random(seed + 7919)  # not the remote host's seed: its keys come from that
    async with open_bridge(kind) as bridge:
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        cfg = DHTConfig(interface="127.0.0.1", bootstrap=[("127.0.0.1", remote.ports[0])])
        async with open_dht_node(key, cfg, bridge) as node, trio.open_nursery() as nursery:
            stop = trio.Event()
            if busy:
                nursery.start_soon(_busy_trio, stop)
            for t in topics[:5]:  # warm up
                await node.lookup(parse_topic(t))
            latencies, queries, good = [], [], 0
            cpu0 = time.process_time()
            for _ in range(lookups):
                t0 = time.perf_counter()
                res = await node.lookup_detailed(parse_topic(rng.choice(topics)))
                latencies.append(time.perf_counter() - t0)
                queries.append(res.queries)
                good += len(res.records) == 1
            cpu = time.process_time() - cpu0
            stop.set()
    out = summary(latencies, good, lookups, queries)
    if not busy:
        out["cpu_ms_per_lookup"] = round(cpu / lookups * 1000, 3)
    return out


async def bench_bridges(lookups: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        remote = await ClusterProcess.start(nursery, nodes=20, seed=seed, bootstrap=[])
        try:
            topics = [topic_text(Topic.manifest(rng.randbytes(32))) for _ in range(20)]
            for i, t in enumerate(topics):
                await remote.request("announce", node=i, topic=t, port=7000 + i)
            for kind in ("thread", "trio-asyncio"):
                r = await bench_bridge_calls(kind, 5000)
                r.update(await bench_bridge_lookups(kind, remote, topics, lookups, False, seed))
                busy = await bench_bridge_lookups(kind, remote, topics, lookups // 2, True, seed)
                r["busy_median_ms"], r["busy_p99_ms"] = busy["median_ms"], busy["p99_ms"]
                out[kind] = r
                print(f"bridge {kind}: {r}", flush=True)
        finally:
            with trio.CancelScope(shield=True):
                await remote.aclose()
            nursery.cancel_scope.cancel()
    return out


# -- part 2: networks with churn ------------------------------------------------------------


async def run_phase(
    hosts: list[ClusterProcess],
    alive: list[tuple[int, int]],
    topics: dict[str, list[tuple[int, int]]],
    dead_hosts: set[int],
    lookups: int,
    rng: random.Random,
) -> dict[str, Any]:
    names = list(topics)
    plan = []
    while len(plan) < lookups:
        topic = rng.choice(names)
        live = [(h, n) for h, n in topics[topic] if h not in dead_hosts]
        if live:
            plan.append((rng.choice(alive), topic, {hosts[h].pubs[n] for h, n in live}))
    latencies: list[float] = []
    queries: list[int] = []
    good = 0
    limiter = trio.CapacityLimiter(16)

    async def one(who: tuple[int, int], topic: str, expected: set[str]) -> None:
        nonlocal good
        async with limiter:
            t0 = trio.current_time()
            with trio.move_on_after(10):
                ans = await hosts[who[0]].request("lookup", node=who[1], topic=topic)
                elapsed = trio.current_time() - t0
                latencies.append(elapsed)
                queries.append(ans["queries"])
                good += elapsed <= SUCCESS_SECONDS and expected <= set(ans["pubs"])

    async with trio.open_nursery() as nursery:
        for item in plan:
            nursery.start_soon(one, *item)
    return summary(latencies, good, lookups, queries)


async def bench_network(size: int, per_host: int, lookups: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    n_hosts = size // per_host
    hosts: list[ClusterProcess] = []
    result: dict[str, Any] = {"nodes": size, "hosts": n_hosts}
    async with trio.open_nursery() as nursery:
        try:
            t0 = trio.current_time()
            first = await ClusterProcess.start(nursery, nodes=per_host, seed=seed, bootstrap=[])
            seed_addr = f"127.0.0.1:{first.ports[0]}"
            slots: list[ClusterProcess | None] = [first] + [None] * (n_hosts - 1)

            async def start(i: int) -> None:
                slots[i] = await ClusterProcess.start(
                    nursery, nodes=per_host, seed=seed * 1000 + i, bootstrap=[seed_addr]
                )

            async with trio.open_nursery() as starters:
                for i in range(1, n_hosts):
                    starters.start_soon(start, i)
            hosts = [h for h in slots if h is not None]
            result["startup_s"] = round(trio.current_time() - t0, 2)

            everyone = [(h, n) for h in range(n_hosts) for n in range(per_host)]
            topics: dict[str, list[tuple[int, int]]] = {}
            for who in everyone:
                topics[topic_text(Topic.manifest(rng.randbytes(32)))] = [who]
            for _ in range(max(1, size // 10)):
                topics[topic_text(Topic.manifest(rng.randbytes(32)))] = rng.sample(everyone, 5)
            t0 = trio.current_time()
            limiter = trio.CapacityLimiter(16)

            async def announce(topic: str, h: int, n: int) -> None:
                async with limiter:
                    await hosts[h].request("announce", node=n, topic=topic, port=7000 + n)

            async with trio.open_nursery() as ann:
                for topic, who in topics.items():
                    for h, n in who:
                        ann.start_soon(announce, topic, h, n)
            result["announce_s"] = round(trio.current_time() - t0, 2)

            result["stable"] = await run_phase(hosts, everyone, topics, set(), lookups, rng)
            dead = set(rng.sample(range(n_hosts), round(0.3 * n_hosts)))
            for h in dead:
                hosts[h].kill()
            alive = [(h, n) for h, n in everyone if h not in dead]
            result["killed"] = await run_phase(hosts, alive, topics, dead, lookups, rng)
            result["killed"]["nodes_killed"] = len(dead) * per_host

            joiners = max(1, round(0.2 * n_hosts))
            live_seed = f"127.0.0.1:{hosts[min(set(range(n_hosts)) - dead)].ports[0]}"
            for j in range(joiners):
                hosts.append(
                    await ClusterProcess.start(
                        nursery, nodes=per_host, seed=seed * 1000 + 500 + j, bootstrap=[live_seed]
                    )
                )
            new = [(h, n) for h in range(n_hosts, n_hosts + joiners) for n in range(per_host)]
            result["joined"] = await run_phase(hosts, alive + new, topics, dead, lookups, rng)
            result["joined"]["nodes_joined"] = joiners * per_host
            stats = [await h.request("stats") for h in hosts if h.alive]
            contacts = [c for s in stats for c in s["contacts"]]
            result["routing_table_mean"] = round(sum(contacts) / len(contacts), 1)
            result["records_per_node_mean"] = round(
                sum(r for s in stats for r in s["records"]) / len(contacts), 1
            )
        finally:
            with trio.CancelScope(shield=True):
                for h in hosts:
                    await h.aclose()
            nursery.cancel_scope.cancel()
    return result


def print_table(results: dict[str, Any]) -> None:
    print(
        "\nbridge        call_us  call_cpu_us  median_ms  p99_ms  cpu_ms/lookup"
        "  busy_median_ms  busy_p99_ms  success"
    )
    for kind, r in results["bridges"].items():
        print(
            f"{kind:<13} {r['call_us']:>7} {r['call_cpu_us']:>12} {r['median_ms']:>10}"
            f" {r['p99_ms']:>7} {r['cpu_ms_per_lookup']:>14} {r['busy_median_ms']:>15}"
            f" {r['busy_p99_ms']:>12} {r['success']:>8}"
        )
    print("\nnodes  phase    lookups  success  median_ms   p99_ms  msgs/lookup")
    for net in results["networks"]:
        for phase in ("stable", "killed", "joined"):
            r = net[phase]
            print(
                f"{net['nodes']:>5}  {phase:<7} {r['lookups']:>8} {r['success']:>8}"
                f" {r['median_ms']:>10} {r['p99_ms']:>8} {r['messages_per_lookup']:>12}"
            )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"bridges": {}, "networks": []}
    with trio.fail_after(args.deadline):
        results["bridges"] = await bench_bridges(args.bridge_lookups, args.seed)
        for size in args.sizes:
            per_host = 5 if size <= 50 else 10
            net = await bench_network(size, per_host, args.lookups, args.seed + size)
            print(f"network {size}: {net}", flush=True)
            results["networks"].append(net)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    p.add_argument("--lookups", type=int, default=300, help="lookups per phase")
    p.add_argument("--bridge-lookups", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline", type=float, default=600, help="give up after this many seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    res = trio.run(main, args)
    print_table(res)
    print(json.dumps(res, sort_keys=True))
