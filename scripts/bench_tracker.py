#!/usr/bin/env python3
"""Announce throughput and latency of the tracker: SQLite, Redis, and two replicas on Redis.

Each case starts real ``tracker serve`` processes on loopback (and a private redis-server when
needed; for the ``redis-pg-*`` cases also a private PostgreSQL cluster holding the registry, the
operations store and the fleet view, as ``tests/support/postgres.py`` starts one), registers an
app, publishes ``--builds`` manifests, then runs the load generator in its own process(es): each
opens ``--connections`` keep-alive HTTP/1.1 connections and sends signed announces as fast as
answers come back, for ``--seconds`` or ``--max-requests``, whichever comes first. Announces are
signed before the clock starts (a real swarm signs on many machines), come from ``--nodes``
distinct node keys spread over the builds, and ask for 30 peers each.

Output: a table per case, then one JSON line:
``{"cases": {"sqlite": {"announces_per_s": .., "p99_ms": ..}, ...}}``.
The load generator is a tiny raw HTTP/1.1 client (httpx costs more CPU per request than the
tracker itself on this 2-core machine, and would measure itself).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pnode.discovery.tracker_api import ANNOUNCE_DOMAIN, SESSION_HEADER, SIGNATURE_HEADER
from p2pnode.release import keys
from p2pnode.release import manifest as M

ADMIN = "bench-admin-token-0123456789abcdef"
APP = "benchgame"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within 15 s")


def start_tracker(
    data: Path,
    redis_url: str | None,
    fast: bool,
    redis_mode: str = "script",
    registry_url: str | None = None,
) -> tuple[subprocess.Popen[Any], int, int]:
    """One ``tracker serve`` process; returns it, its main port and its announce port (the
    fast listener's when ``fast``, else the main port)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tracker",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data",
        str(data),
        "--admin-token",
        ADMIN,
        "--client-rate",
        "0",
    ]
    if redis_url:
        cmd += ["--redis", redis_url, "--redis-mode", redis_mode]
    if registry_url:
        cmd += ["--registry", registry_url]
    announce_port = port
    if fast:
        announce_port = free_port()
        cmd += ["--announce-listen", f"127.0.0.1:{announce_port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    wait_port(port, proc, "tracker")
    wait_port(announce_port, proc, "tracker's announce listener")
    return proc, port, announce_port


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def make_manifests(n: int) -> tuple[Any, list[M.SignedManifest]]:
    key = keys.generate_key()
    now = int(time.time())
    out = []
    for build in range(1, n + 1):
        data = os.urandom(64)
        m = M.Manifest(
            app=APP,
            version=f"1.{build}",
            build=build,
            channel="stable",
            created=now - 10,
            expires=now + 86400,
            key=keys.public_key_bytes(key),
            files=(
                M.FileEntry(
                    "f", 64, M.MODE_FILE, (M.ChunkRef(blake3.blake3(data).digest(), 0, 64),)
                ),
            ),
        )
        out.append(M.sign(m, key))
    return key, out


def setup(url: str, key: Any, manifests: list[M.SignedManifest]) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        c.post(
            "/v1/apps", json={"app": APP, "key": keys.format_public_key(keys.public_key_bytes(key))}
        ).raise_for_status()
        for s in manifests:
            c.post(
                f"/v1/apps/{APP}/channels/stable/manifests", content=s.encode()
            ).raise_for_status()


def announce_body(pub: str, mid: str, port: int, **fields: int) -> bytes:
    """A fresh announce body (new nonce and timestamp) for node key ``pub``."""
    doc = {
        "key": pub,
        "ts": int(time.time()),
        "nonce": os.urandom(12).hex(),
        "app": APP,
        "manifest": mid,
        "port": port,
        **fields,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def presign(n: int, nodes: int, mids: list[str], seed: int) -> tuple[list[Any], list[Announce]]:
    """Node keys, and ``n`` distinct signed announces by them (node index, body, signature)."""
    node_keys = [keys.generate_key() for _ in range(nodes)]
    pubs = [keys.format_public_key(keys.public_key_bytes(k)) for k in node_keys]
    out = []
    for i in range(n):
        j = (i * 7919 + seed) % nodes
        left = 0 if j % 4 == 0 else 1000 - (i % 1000)
        body = announce_body(
            pubs[j],
            mids[j % len(mids)],
            7000 + j,
            size=1000,
            left=left,
            from_peers=i,
            from_cdn=i,
            numwant=30,
        )
        out.append((j, body, keys.sign(node_keys[j], ANNOUNCE_DOMAIN, body).hex()))
    return node_keys, out


Announce = tuple[int, bytes, str]


def frame(body: bytes, sig: str, session: str | None = None) -> bytes:
    """One complete HTTP request for an announce."""
    extra = f"{SESSION_HEADER}: {session}\r\n" if session else ""
    return (
        b"POST /v1/announce HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"{SIGNATURE_HEADER}: {sig}\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def open_sessions(port: int, node_keys: list[Any], mids: list[str]) -> list[str]:
    """One verified announce per node, as each node's first of the day: its session token."""
    tokens = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for j, k in enumerate(node_keys):
            pub = keys.format_public_key(keys.public_key_bytes(k))
            body = announce_body(pub, mids[j % len(mids)], 7000 + j, numwant=0)
            sig = keys.sign(k, ANNOUNCE_DOMAIN, body).hex()
            r = c.post("/v1/announce", content=body, headers={SIGNATURE_HEADER: sig})
            r.raise_for_status()
            tokens.append(str(r.json()["session"]))
    return tokens


async def _load(
    ports: list[int],
    requests: list[bytes],
    conns: int,
    seconds: float,
) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    it = iter(requests)
    deadline = trio.current_time() + seconds

    async def one(port: int) -> None:
        nonlocal errors
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = b""
        async with stream:
            for req in it:
                if trio.current_time() > deadline:
                    return
                t0 = time.perf_counter()
                await stream.send_all(req)
                while True:
                    head_end = buf.find(b"\r\n\r\n")
                    if head_end >= 0:
                        head = buf[:head_end].lower()
                        cl = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                        if len(buf) >= head_end + 4 + cl:
                            status = int(buf[9:12])
                            buf = buf[head_end + 4 + cl :]
                            break
                    data = await stream.receive_some(65536)
                    if not data:
                        raise RuntimeError("tracker closed the connection")
                    buf += data
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1

    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(one, ports[i % len(ports)])
    return lat, errors


def load_worker(
    ports: list[int],
    mids: list[str],
    n: int,
    nodes: int,
    conns: int,
    seconds: float,
    seed: int,
    start_at: float,
    q: Any,
    sessions: bool = False,
) -> None:
    """One load-generator process: presign, open sessions (steady state: nodes announce every
    interval for hours, one verified announce per session ttl), wait for the common start,
    run, report."""
    node_keys, announces = presign(n, nodes, mids, seed)
    tokens = open_sessions(ports[0], node_keys, mids) if sessions else None
    reqs = [frame(body, sig, tokens[j] if tokens else None) for j, body, sig in announces]
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    lat, errors = trio.run(_load, ports, reqs, conns, seconds)
    q.put((lat, errors, time.perf_counter() - t0))


def run_case(
    name: str,
    replicas: int,
    redis: bool,
    fast: bool,
    args: argparse.Namespace,
    sessions: bool = False,
    redis_mode: str = "script",
    loaded: int | None = None,
    postgres: bool = False,
) -> dict[str, Any]:
    """One case; ``loaded``: how many of the replicas the generator sends to (default all; the
    others only follow the log, which measures what following costs a replica); ``postgres``:
    the registry (and with it the operations store and the fleet) in a private PostgreSQL."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracker-"))
    procs: list[subprocess.Popen[Any]] = []
    cluster = None
    try:
        registry_url = None
        if postgres:
            from tests.support.postgres import PostgresCluster

            cluster = PostgresCluster()
            cluster.start()
            registry_url = cluster.new_database()
        redis_url = None
        redis_pids: list[int] = []
        if redis:
            rport = free_port()
            binary = shutil.which("redis-server") or "redis-server"
            rp = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp),
                ],
                stdout=subprocess.DEVNULL,
            )
            procs.append(rp)
            redis_pids.append(rp.pid)
            wait_port(rport, rp, "redis-server")
            redis_url = f"redis://127.0.0.1:{rport}/0"
        ports = []
        main_ports = []
        for _ in range(replicas):
            p, port, announce_port = start_tracker(
                tmp / "data", redis_url, fast, redis_mode, registry_url
            )
            procs.append(p)
            main_ports.append(port)
            ports.append(announce_port)
        key, manifests = make_manifests(args.builds)
        setup(f"http://127.0.0.1:{main_ports[0]}", key, manifests)
        mids = [s.id.hex() for s in manifests]
        q: Any = mp.Queue()
        per = args.max_requests // args.workers
        start_at = time.time() + 2.0 + per / 20000 + (args.nodes / 300 if sessions else 0)
        workers = [
            mp.Process(
                target=load_worker,
                args=(
                    ports[: loaded or replicas],
                    mids,
                    per,
                    args.nodes,
                    args.connections,
                    args.seconds,
                    w,
                    start_at,
                    q,
                    sessions,
                ),
            )
            for w in range(args.workers)
        ]
        for w in workers:
            w.start()
        tracker_pids = [p.pid for p in procs[-replicas:]]
        time.sleep(max(0.0, start_at - time.time()))  # presigning and sessions not counted
        cpu0 = cpu_seconds(tracker_pids)
        each0 = [cpu_seconds([pid]) for pid in tracker_pids]
        rcpu0 = cpu_seconds(redis_pids) if redis_pids else 0.0
        results = [q.get(timeout=args.seconds + 120) for _ in workers]
        cpu = cpu_seconds(tracker_pids) - cpu0
        each = [cpu_seconds([pid]) - c0 for pid, c0 in zip(tracker_pids, each0, strict=True)]
        rcpu = (cpu_seconds(redis_pids) - rcpu0) if redis_pids else 0.0
        for w in workers:
            w.join(timeout=10)
        lat = sorted(x for r in results for x in r[0])
        errors = sum(r[1] for r in results)
        wall = max(r[2] for r in results)
        n = len(lat)
        out = {
            "announces_per_s": round(n / wall, 1),
            "p50_ms": round(lat[n // 2] * 1000, 2),
            "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 2),
            "requests": n,
            "errors": errors,
            "seconds": round(wall, 2),
            "replicas": replicas,
            "listener": "fast" if fast else "hypercorn",
            "sessions": sessions,
            "redis_mode": redis_mode if redis else None,
            "registry": "postgres" if postgres else "sqlite",
            # tracker CPU per announce (includes presign wait: idle costs ~0): the capacity of
            # one core, whatever else shares this machine
            "tracker_cpu_us_per_announce": round(cpu / max(1, n) * 1e6, 1),
            "redis_cpu_us_per_announce": round(rcpu / max(1, n) * 1e6, 1) if redis else None,
            "replica_cpu_us_per_announce": [round(c / max(1, n) * 1e6, 1) for c in each],
            "loaded_replicas": loaded or replicas,
        }
        print(
            f"{name:>22}: {out['announces_per_s']:8.1f} announces/s  p50 {out['p50_ms']:6.2f} ms"
            f"  p99 {out['p99_ms']:6.2f} ms  ({n} requests, {errors} errors, tracker CPU "
            f"{out['tracker_cpu_us_per_announce']:.0f} us/announce"
            + (f", redis {out['redis_cpu_us_per_announce']:.0f} us" if redis else "")
            + (
                f"; per replica {'/'.join(f'{c:.0f}' for c in out['replica_cpu_us_per_announce'])}"
                " us"
                if replicas > 1
                else ""
            )
            + ")",
            flush=True,
        )
        return out
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per case (default %(default)s)")
    ap.add_argument("--max-requests", type=int, default=40_000, help="per case, all workers")
    ap.add_argument("--workers", type=int, default=1, help="load-generator processes")
    ap.add_argument("--connections", type=int, default=16, help="per worker")
    ap.add_argument("--nodes", type=int, default=1000, help="distinct node keys per worker")
    ap.add_argument("--builds", type=int, default=3)
    table = {
        "sqlite": (1, False, False),
        "redis": (1, True, False),
        "redis-2-replicas": (2, True, False),
        "sqlite-fast": (1, False, True),
        "redis-fast": (1, True, True),
        "redis-2-replicas-fast": (2, True, True),
        "sqlite-fast-session": (1, False, True),
        "redis-fast-session": (1, True, True),
        "redis-2-replicas-fast-session": (2, True, True),
        "redis-log-fast-session": (1, True, True),
        "redis-log-2-replicas-fast-session": (2, True, True),
        # load on the first replica only: the second's CPU is what following the log costs
        "redis-log-2-replicas-follower-fast-session": (2, True, True),
        # the registry, operations store and fleet in PostgreSQL beside the Redis swarm
        "redis-pg": (1, True, False),
        "redis-pg-fast-session": (1, True, True),
        "redis-pg-2-replicas-fast-session": (2, True, True),
    }
    ap.add_argument(
        "--cases",
        default=",".join(table),
        help="comma-separated; *-fast cases announce to the fast listener (--announce-listen), "
        "*-session cases carry announce session tokens (steady state: no signature checks), "
        "redis-log-* cases run --redis-mode log, redis-pg-* ones --registry postgresql:// (a "
        "private PostgreSQL cluster, as the tests start one)",
    )
    args = ap.parse_args()
    cases = {}
    for name in args.cases.split(","):
        if name not in table:
            raise SystemExit(f"unknown case {name!r}; choose from {', '.join(table)}")
        replicas, redis, fast = table[name]
        mode = "log" if name.startswith("redis-log") else "script"
        cases[name] = run_case(
            name,
            replicas,
            redis,
            fast,
            args,
            name.endswith("-session"),
            redis_mode=mode,
            loaded=1 if "-follower" in name else None,
            postgres=name.startswith("redis-pg"),
        )
    print(json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
