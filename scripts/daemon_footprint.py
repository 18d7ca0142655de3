#!/usr/bin/env python3
"""Memory and idle CPU of one ``p2pnode daemon`` holding many installed small games.

Publishes ``--games`` small games (``--size-kb`` each, a few files) to nginx on loopback, adds
them to a fresh state dir as the API would, starts ``p2pnode daemon --listen 127.0.0.1:0`` on it
and waits until every install job is done. With ``--tracker`` the games are published to a
local tracker too and followed through its feed (one long poll per game, and each installed
build kept listed there: what a daemon of a tracker-following library does when idle).

Then, with nothing to do, it reads the daemon's RSS (``/proc/PID/status`` VmRSS) and the CPU
time it used (``/proc/PID/stat`` utime+stime) over ``--idle`` seconds. Prints a summary line for
people and, last, one JSON line: ``games``, ``install_s``, ``rss_mb``, ``idle_cpu_pct`` (percent
of one core), ``idle_s``.

Usage: python3 scripts/daemon_footprint.py [--games 50] [--size-kb 256] [--idle 60]
       [--tracker] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pnode.demo.cdn import LocalCDN
from p2pnode.release import keys
from p2pnode.release.publish import publish
from p2pnode.service.control import Service
from p2pnode.service.statedir import StateDir, read_json

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def make_games(
    work: Path, cdn: LocalCDN, n: int, size: int, *, local: bool
) -> list[tuple[str, str]]:
    """(app, manifest URL) of ``n`` games, published to the CDN dir if ``local`` (else the
    tracker publishes them)."""
    key = keys.generate_key()
    (work / "pub.txt").write_text(keys.format_public_key(keys.public_key_bytes(key)))
    keys.save_private_key(key, work / "key.pem")
    out = []
    for i in range(n):
        src = work / "src" / f"game{i}"
        (src / "data").mkdir(parents=True)
        rng = random.Random(i)
        (src / "data" / "pack.bin").write_bytes(rng.randbytes(size))
        (src / "run.sh").write_text("#!/bin/sh\necho game\n")
        (src / "readme.txt").write_text(f"game {i}\n")
        url = ""
        if local:
            pub = publish(src, app=f"game{i}", version="1.0", build=1, key=key, out=cdn.root)
            url = cdn.url + pub.manifest_path
        out.append((f"game{i}", url))
    return out


def publish_to_tracker(
    work: Path, cdn: LocalCDN, url: str, admin: str, games: list[tuple[str, str]]
) -> None:
    """The same games on the tracker's channels too, naming the CDN as their mirror."""
    pub = (work / "pub.txt").read_text()
    for app, _ in games:
        add = ["app", "add", app, "--key", pub, "--url", url, "--admin-token", admin]
        subprocess.run([sys.executable, "-m", "tracker", *add], check=True, capture_output=True)
        src = work / "src" / app
        cmd = ["publish", str(src), "--app", app, "--version", "1.0", "--build", "1"]
        cmd += ["--key", str(work / "key.pem"), "--out", str(cdn.root), "--mirror", cdn.url]
        cmd += ["--tracker", url, "--token", admin, "--json"]
        subprocess.run([sys.executable, "-m", "p2pnode", *cmd], check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--games", type=int, default=50)
    ap.add_argument("--size-kb", type=int, default=256)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--tracker", action="store_true")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="p2pnode-footprint-"))
    (work / "cdn").mkdir(parents=True, exist_ok=True)
    tracker_cm = None
    try:
        with LocalCDN(work / "cdn") as cdn:
            games = make_games(work, cdn, args.games, args.size_kb * 1024, local=not args.tracker)
            trust = [(work / "pub.txt").read_text()]
            tracker_url = None
            if args.tracker:
                from p2pnode.demo.tracker import LocalTracker

                admin = "footprint-admin-token-0123456789"
                tracker_cm = LocalTracker(work / "tracker", admin)
                tracker_url = tracker_cm.__enter__()
                publish_to_tracker(work, cdn, tracker_url, admin, games)
            state = StateDir(work / "state")
            state.lock()
            svc = Service.open(state, {}, "none")
            svc.set_setting("max_active", 4)
            for i, (app, url) in enumerate(games):
                dest = str(work / "games" / f"g{i}")
                if tracker_url:
                    svc.add(app, dest, trust, tracker=tracker_url)
                else:
                    svc.add(url, dest, trust)
            state.unlock()
            env = {**os.environ, "P2PNODE_CONFIG": str(work / "none.toml")}
            cmd = [sys.executable, "-m", "p2pnode", "daemon", "--state", str(work / "state")]
            cmd += ["--listen", "127.0.0.1:0", "--quiet"]
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            try:
                while True:
                    doc = read_json(work / "state" / "queue.json") or {"jobs": []}
                    done = [j for j in doc["jobs"] if j["state"] == "installed"]
                    bad = [j for j in doc["jobs"] if j["state"] == "failed"]
                    if bad:
                        raise SystemExit(f"a job failed: {bad[0]['error']}")
                    if len(done) == args.games:
                        break
                    if proc.poll() is not None:
                        raise SystemExit("the daemon exited")
                    time.sleep(0.2)
                install_s = time.monotonic() - t0
                time.sleep(5.0)  # let the last refresh and reports settle
                c0, w0 = cpu_seconds(proc.pid), time.monotonic()
                time.sleep(args.idle)
                c1, w1 = cpu_seconds(proc.pid), time.monotonic()
                rss = rss_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        cpu = 100.0 * (c1 - c0) / (w1 - w0)
        print(
            f"{args.games} games installed in {install_s:.1f}s; idle for {w1 - w0:.0f}s: "
            f"RSS {rss:.1f} MB, CPU {cpu:.2f}% of one core"
            + (" (following a tracker)" if args.tracker else "")
        )
        print(
            json.dumps(
                {
                    "games": args.games,
                    "tracker": args.tracker,
                    "install_s": round(install_s, 1),
                    "rss_mb": round(rss, 1),
                    "idle_cpu_pct": round(cpu, 3),
                    "idle_s": round(w1 - w0, 1),
                }
            )
        )
        return 0
    finally:
        if tracker_cm is not None:
            tracker_cm.__exit__(None, None, None)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
