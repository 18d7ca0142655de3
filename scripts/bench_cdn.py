#!/usr/bin/env python3
"""CDN-only install speed against aria2c, measured in the same run on the same nginx.

Two release shapes, each published to a directory served by nginx on loopback:

* ``mixed`` (default 1 GiB): three large packs, medium assets and hundreds of small files;
* ``packs`` (default 2 x 1 GiB packs plus twenty 5 MiB files): what games are mostly made of,
  and where one connection per file cannot keep up.

aria2c -x8 -s8 fetches the same files to disk, then `p2pnode install` (CDN only) does its
install (fetch, verify every chunk, stage, fsync, switch); the two alternate for ``--runs``
rounds so both see the same machine load, and medians are reported. Both write to the same
filesystem, from a warm nginx page cache. Prints a table per shape for people and, last, one
JSON line: per shape ``ratio`` (median aria2c seconds / median p2pnode seconds; >= 1.0 means
at least as fast) and ``peak_rss_mb`` (the p2pnode process, over all runs), plus
``hash_gbps`` (blake3 on this machine, one thread) and the load average before the runs.

Usage: python3 scripts/bench_cdn.py [--shape mixed|packs|both] [--size-mb N] [--runs 3]
       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pnode.demo.cdn import LocalCDN
from p2pnode.release import keys
from p2pnode.release.publish import publish

#: Default release size per shape, in MiB.
DEFAULT_SIZE_MB = {"mixed": 1024, "packs": 2 * 1024 + 100}


def mixed_sizes(total: int, seed: int = 7) -> list[int]:
    """Mixed sizes, like a game: a few huge packs, some medium assets, many small files."""
    rng = random.Random(seed)
    plan = [0.40, 0.20, 0.10]  # three large packs
    sizes = [int(total * p) for p in plan]
    rest = total - sum(sizes)
    medium = rest * 2 // 3
    while medium > 0:
        s = min(medium, rng.randint(2 << 20, 24 << 20))
        sizes.append(s)
        medium -= s
    small = total - sum(sizes)
    while small > 0:
        s = min(small, rng.randint(1 << 10, 512 << 10))
        sizes.append(s)
        small -= s
    return sizes


def packs_sizes(total: int) -> list[int]:
    """Two big packs and twenty small files of 5 MiB (less below 400 MiB, so that the
    packs stay the bulk); the packs share what the small files leave equally."""
    small = min(5 << 20, total // 80)
    rest = total - 20 * small
    return [rest // 2, rest - rest // 2] + [small] * 20


def make_release(root: Path, sizes: list[int], seed: int = 7) -> None:
    """Random (incompressible) content written from one seeded stream (fast to generate)."""
    stream = blake3.blake3(b"bench-cdn-%d" % seed)
    offset = 0
    for i, size in enumerate(sizes):
        d = root / f"dir{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"file{i:04d}.bin", "wb") as f:
            left = size
            while left:
                n = min(left, 8 << 20)
                f.write(stream.digest(length=n, seek=offset))
                offset += n
                left -= n


def hash_gbps() -> float:
    data = os.urandom(256 << 20)
    blake3.blake3(data).digest()
    t = time.perf_counter()
    blake3.blake3(data).digest()
    return len(data) / (time.perf_counter() - t) / 1e9


def drop_dest(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / f".{path.name}.p2pnode", ignore_errors=True)


def run_aria2(url_list: Path, out: Path) -> float:
    aria = shutil.which("aria2c")
    if not aria:
        raise SystemExit("aria2c is not installed (run `bash scripts/setup.sh`)")
    out.mkdir(parents=True)
    t = time.perf_counter()
    subprocess.run(
        [
            aria,
            "-x8",
            "-s8",
            "-j8",
            "-q",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--file-allocation=none",
            "-d",
            str(out),
            "-i",
            str(url_list),
        ],
        check=True,
    )
    return time.perf_counter() - t


def run_node(manifest_url: str, dest: Path, pub: str) -> tuple[float, float, dict[str, object]]:
    """Wall seconds, peak RSS (MB) and the --json result of one `p2pnode install`.

    The peak RSS is measured by GNU time, which forks the node from its own small process: a
    child forked straight from this script would start with this script's RSS on its account.
    """
    gnu_time = "/usr/bin/time"
    if not os.access(gnu_time, os.X_OK):
        raise SystemExit("GNU time is not installed (run `bash scripts/setup.sh`)")
    rss_file = dest.parent / "rss.txt"
    t = time.perf_counter()
    proc = subprocess.run(
        [
            gnu_time,
            "-f",
            "%M",
            "-o",
            str(rss_file),
            sys.executable,
            "-m",
            "p2pnode",
            "install",
            manifest_url,
            "--dest",
            str(dest),
            "--trust",
            pub,
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"p2pnode install failed: {proc.stderr}")
    rss_kb = int(rss_file.read_text().split()[-1])
    return seconds, rss_kb / 1024, json.loads(proc.stdout)


def bench_shape(shape: str, size_mb: int, runs: int, workdir: Path | None) -> dict[str, object]:
    """Publish one release shape, run aria2c and p2pnode alternately ``runs`` times each,
    print a table and return the figures."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-cdn-{shape}-", dir=workdir))
    try:
        src, cdn_dir = work / "src", work / "cdn"
        total = size_mb << 20
        make_release(src, packs_sizes(total) if shape == "packs" else mixed_sizes(total))
        key = keys.generate_key()
        pub = keys.format_public_key(keys.public_key_bytes(key))
        t = time.perf_counter()
        res = publish(src, app="bench", version="1", build=1, key=key, out=cdn_dir)
        publish_s = time.perf_counter() - t
        shutil.rmtree(src)
        m = res.manifest
        with LocalCDN(cdn_dir) as cdn:
            urls = work / "urls.txt"
            with open(urls, "w") as f:
                for fe in m.files:
                    f.write(f"{cdn.url}bench/1/files/{fe.path}\n  out={fe.path}\n")
            # Warm the page cache so both clients read from memory. Read in pieces: a forked
            # child's peak RSS starts at its parent's, so the parent must stay small.
            for fe in m.files:
                with open(cdn_dir / "bench/1/files" / fe.path, "rb") as f:
                    while f.read(8 << 20):
                        pass
            aria_times, node_times, rss = [], [], 0.0
            result: dict[str, object] = {}
            for _ in range(runs):
                # Each client starts with no dirty pages of the other's to flush. aria2c leaves
                # its files in the page cache; p2pnode fsyncs before its atomic switch.
                out = work / "aria"
                os.sync()
                aria_times.append(run_aria2(urls, out))
                shutil.rmtree(out)
                dest = work / "install"
                os.sync()
                s, r, result = run_node(cdn.url + res.manifest_path, dest, pub)
                node_times.append(s)
                rss = max(rss, r)
                drop_dest(dest)
        aria_s, node_s = statistics.median(aria_times), statistics.median(node_times)
        size = m.total_size
        rows = [
            ("shape", shape),
            (
                "release",
                f"{size / 2**20:.0f} MiB in {len(m.files)} files, {len(m.unique_chunks())} chunks",
            ),
            ("publish", f"{publish_s:.2f} s ({size / publish_s / 1e6:.0f} MB/s)"),
            ("aria2c -x8 -s8", _runs_text(aria_times, size)),
            ("p2pnode install", _runs_text(node_times, size)),
            ("ratio aria2c/p2pnode", f"{aria_s / node_s:.2f}  (medians; target >= 1.0)"),
            ("p2pnode peak RSS", f"{rss:.0f} MB  (target < 200)"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print(flush=True)
        return {
            "ratio": round(aria_s / node_s, 3),
            "peak_rss_mb": round(rss, 1),
            "aria2c_s": round(aria_s, 3),
            "p2pnode_s": round(node_s, 3),
            "aria2c_runs": [round(t, 3) for t in aria_times],
            "p2pnode_runs": [round(t, 3) for t in node_times],
            "bytes": size,
            "files": len(m.files),
            "bytes_cdn": result.get("bytes_cdn"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _runs_text(times: list[float], size: int) -> str:
    med = statistics.median(times)
    each = ", ".join(f"{t:.2f}" for t in times)
    return f"{med:.2f} s median ({size / med / 1e6:.0f} MB/s; runs {each})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["mixed", "packs", "both"], default="both")
    ap.add_argument(
        "--size-mb",
        type=int,
        help=f"release size per shape (default: {DEFAULT_SIZE_MB})",
    )
    ap.add_argument("--runs", type=int, default=3, help="rounds of aria2c then p2pnode")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    shapes = ["mixed", "packs"] if args.shape == "both" else [args.shape]
    load_before = os.getloadavg()
    out: dict[str, object] = {}
    for shape in shapes:
        size_mb = args.size_mb or DEFAULT_SIZE_MB[shape]
        out[shape] = bench_shape(shape, size_mb, args.runs, args.workdir)
    gbps = hash_gbps()
    print(f"blake3 one thread  {gbps:.2f} GB/s")
    print(f"load average before  {' '.join(f'{x:.2f}' for x in load_before)} (2 cores)")
    out["hash_gbps"] = round(gbps, 2)
    out["load_before"] = [round(x, 2) for x in load_before]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
