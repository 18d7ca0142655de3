#!/usr/bin/env python3
"""Fleet-view memory benchmark (issue 18 item 2): a million nodes within 1 GiB of tracker memory.

What it does:

1. Loads ``--nodes`` seats (default 1,000,000) into a fresh in-memory fleet through the store
   interface the tracker uses (``LocalFleet.seen``, ``outcome``): 8 builds of one app, 4 client
   versions, one outcome per 10 nodes, then moves a fifth of the nodes to the newest build.
2. Prints the process's resident memory before and after (``/proc/self/status`` VmRSS), the
   growth per node, and that figure against the raw node id (20 bytes) as the anchor.
3. Times the views an operator asks for (one app's fleet, one node, the gauges) and one full
   expiry sweep.
4. With ``--redis`` (a redis-server is started on a free loopback port, as the tests do),
   loads the same seats into ``RedisFleet`` and prints Redis' ``used_memory`` per node.
5. With ``--postgres`` (a throwaway cluster, as the tests start one), loads them into
   ``PGFleet`` and prints the fleet tables' size on disk per node (indexes included), the load
   rate, the tracker process's RSS growth and the views' times.
6. For both shared stores, the CPU the tracker process spends writing a seat (its share of a
   flush: what competes with announces for the interpreter), ``write_cpu_us_per_seat``.
   ``--skip-memory`` leaves out 1-3, so that the RSS figures of 5 are not the in-memory fleet's.

Prints a table, then one JSON line. Target: tracker memory growth for 1M nodes under 1 GiB
(the raw ids alone are 20 MB).

Usage: python3 scripts/bench_fleet.py [--nodes 1000000] [--redis] [--postgres] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import trio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tracker.fleet import FleetOutcome, MemoryFleet, Sighting
from tracker.fleet_store import FleetStore, LocalFleet

BUILDS = [(bytes([b]) * 32, b) for b in range(1, 9)]
CLIENTS = ["0.1.0", "0.1.1", "0.2.0", None]
T0 = 1_800_000_000.0


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def node_id(i: int) -> bytes:
    return i.to_bytes(4, "big") * 5  # 20 bytes, distinct per i


def load(store: FleetStore, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        m, b = BUILDS[i % len(BUILDS)]
        store.seen(Sighting(node_id(i), "game", m, b, CLIENTS[i % len(CLIENTS)], T0 + i % 600))
        if i % 10 == 0:
            store.outcome(
                FleetOutcome(node_id(i), "game", m, "update", None, b - 1, b, T0 + i % 600)
            )
    newest_m, newest_b = BUILDS[-1]
    for i in range(0, n, 5):
        store.seen(Sighting(node_id(i), "game", newest_m, newest_b, None, T0 + 700))
    return time.perf_counter() - t0


async def views(store: FleetStore) -> dict[str, float]:
    out = {}
    for name, call in (
        ("app_view_ms", lambda: store.app_view("game", T0)),
        ("node_view_ms", lambda: store.node_view(node_id(12345))),
        ("gauges_ms", store.gauges),
    ):
        t0 = time.perf_counter()
        res: Any = await call()
        assert res
        out[name] = round((time.perf_counter() - t0) * 1000, 2)
    return out


def bench_memory(n: int) -> dict[str, Any]:
    before = rss()
    fleet = MemoryFleet()
    store = LocalFleet(fleet)
    load_s = load(store, n)
    after = rss()
    result: dict[str, Any] = {
        "nodes": len(fleet),
        "load_s": round(load_s, 2),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "bytes_per_node": round((after - before) / n, 1),
    }
    result["x_raw_id"] = round(result["bytes_per_node"] / 20, 1)
    result.update(trio.run(views, store))
    t0 = time.perf_counter()
    slices = 0
    while True:  # a full sweep, a slice at a time, nothing expired
        fleet.gc(T0 + 800)
        slices += 1
        if fleet._sweep == 0:
            break
    result["sweep_slice_ms"] = round((time.perf_counter() - t0) * 1000 / slices, 2)
    return result


def bench_redis(n: int) -> dict[str, Any]:
    from tracker.fleet_redis import RedisFleet

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (fix: bash scripts/setup.sh)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-fleet-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        store = RedisFleet(f"redis://127.0.0.1:{port}/0", prefix="b:")
        empty = int(store._r.info("memory")["used_memory"])
        load_s, cpu = load_shared(store, n)
        used = int(store._r.info("memory")["used_memory"])
        out: dict[str, Any] = {
            "redis_load_s": round(load_s, 1),
            "redis_write_cpu_us_per_seat": round(cpu / n * 1e6, 1),
            "redis_used_mib": round(used / 2**20, 1),
            "redis_bytes_per_node": round((used - empty) / n, 1),
        }
        out.update({f"redis_{k}": v for k, v in trio.run(views, store).items()})
        store.close()
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_postgres(n: int) -> dict[str, Any]:
    from tests.support.postgres import PostgresCluster
    from tracker.fleet_pg import PGFleet
    from tracker.pg import PGDatabase

    cluster = PostgresCluster()
    cluster.start()
    try:
        db = PGDatabase(cluster.new_database())
        store = PGFleet(db)
        size = (
            "SELECT SUM(pg_total_relation_size(oid)) FROM pg_class "
            "WHERE relkind = 'r' AND relname LIKE 'fleet%%'"
        )
        with db.connection("measure") as c:
            empty = int(c.execute(size).fetchone()[0])  # type: ignore[index]
        rss0 = rss()
        load_s, cpu = load_shared(store, n)
        rss1 = rss()
        with db.connection("measure") as c:
            c.execute("VACUUM ANALYZE")
            used = int(c.execute(size).fetchone()[0])  # type: ignore[index]
        out: dict[str, Any] = {
            "pg_load_s": round(load_s, 1),
            "pg_seats_per_s": round(n / load_s),
            "pg_write_cpu_us_per_seat": round(cpu / n * 1e6, 1),
            "pg_tracker_rss_mib": round(rss1 / 2**20, 1),
            "pg_tracker_rss_growth_mib": round((rss1 - rss0) / 2**20, 1),
            "pg_disk_mib": round(used / 2**20, 1),
            "pg_bytes_per_node": round((used - empty) / n, 1),
        }
        out.update({f"pg_{k}": v for k, v in trio.run(views, store).items()})
        db.close()
        return out
    finally:
        cluster.stop()


def load_shared(store: Any, n: int) -> tuple[float, float]:
    """Load ``n`` seats into a write-behind store, 50,000 per flush; (wall seconds, CPU
    seconds this process spent in the flushes' writes)."""
    t0 = time.perf_counter()
    cpu = 0.0
    step = 50_000
    for lo in range(0, n, step):
        load_part(store, lo, min(n, lo + step))
        c0 = time.process_time()
        store.write(store.take())
        cpu += time.process_time() - c0
    return time.perf_counter() - t0, cpu


def load_part(store: FleetStore, lo: int, hi: int) -> None:
    for i in range(lo, hi):
        m, b = BUILDS[i % len(BUILDS)]
        store.seen(Sighting(node_id(i), "game", m, b, CLIENTS[i % len(CLIENTS)], T0 + i % 600))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1_000_000)
    ap.add_argument("--redis", action="store_true", help="also measure the Redis fleet")
    ap.add_argument("--postgres", action="store_true", help="also measure the PostgreSQL fleet")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the in-memory fleet")
    args = ap.parse_args()
    result = {"nodes": args.nodes} if args.skip_memory else bench_memory(args.nodes)
    if args.redis:
        result.update(bench_redis(args.nodes))
    if args.postgres:
        result.update(bench_postgres(args.nodes))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
