#!/usr/bin/env python3
"""Benchmark delta patches: what an update fetches with patches, without, and what rsync and
``zstd --patch-from`` would need, on real consecutive releases and a synthetic game pack.

Real pairs are wheels of consecutive versions of packages with compiled extensions, fetched
from the package index at benchmark time (``pip download``) and unpacked. The synthetic pair
is a game-like pack of incompressible data with scattered small edits and one insertion
(``--synthetic-size`` sets its size; use e.g. ``4G`` for the multi-GiB case).

For each pair: release size; bytes the ``update`` fetched with patches and without
(``--no-patches``); rsync ``--no-whole-file`` literal bytes; ``zstd -19 --long --patch-from``
summed over changed files; publish and update time and peak RSS (each a child process);
apply speed (decode + blake3 of every patch's output, in process, MB/s of output). The last
line is one JSON object. Targets (issue 17): update bytes <= 1.5x zstd, apply >= 200 MB/s.

Usage: PYTHONPATH=. python3 scripts/bench_delta.py [--pairs pkg:v1:v2 ...] [--synthetic-size 256M]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from p2pnode.release import keys, layout
from p2pnode.release import manifest as M
from p2pnode.release.delta import apply_patch, result_chunks, split_verified
from p2pnode.units import parse_size

DEFAULT_PAIRS = ["pydantic-core:2.16.1:2.16.2", "numpy:1.26.3:1.26.4"]
BLOCK = 16 << 20


def run(cmd: list[str]) -> tuple[str, float, int]:
    """Run ``cmd``; its stdout, wall seconds and peak RSS (bytes)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} failed: {err.read().decode()[-2000:]}")
        return out.read().decode(), seconds, usage.ru_maxrss * 1024


def p2pnode(*args: str) -> tuple[dict[str, Any], float, int]:
    text, seconds, rss = run([sys.executable, "-m", "p2pnode", *args, "--json"])
    return json.loads(text), seconds, rss


# -- the pairs -------------------------------------------------------------------------------


def wheel_pair(spec: str, work: Path) -> tuple[str, Path, Path]:
    pkg, v1, v2 = spec.split(":")
    dirs = []
    for v in (v1, v2):
        dl = work / f"dl-{pkg}-{v}"
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "-q", "--no-deps"),
                *("--only-binary=:all:", "-d", str(dl), f"{pkg}=={v}"),
            ],
            check=True,
            capture_output=True,
        )
        (wheel,) = dl.glob("*.whl")
        src = work / f"{pkg}-{v}"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(src)
        dirs.append(src)
    return f"{pkg} {v1} -> {v2}", dirs[0], dirs[1]


def synthetic_pair(work: Path, size: int, edits: int, seed: int = 7) -> tuple[str, Path, Path]:
    """A pack of ``size`` random bytes and the same with ``edits`` small overwrites and one
    64 KiB insertion in the middle (it shifts everything after it), plus a small text file
    changed; written in blocks so a multi-GiB pack needs no multi-GiB memory."""
    rng = random.Random(seed)
    a, b = work / "game-1", work / "game-2"
    for d in (a, b):
        (d / "data").mkdir(parents=True)
    cuts = sorted(rng.randrange(size) for _ in range(edits))
    insert_at = size // 2
    with open(a / "data" / "pack.bin", "wb") as fa, open(b / "data" / "pack.bin", "wb") as fb:
        pos = 0
        while pos < size:
            block = bytearray(rng.randbytes(min(BLOCK, size - pos)))
            fa.write(block)
            for c in cuts:
                if pos <= c < pos + len(block):
                    n = rng.randrange(16, 4096)
                    block[c - pos : c - pos + n] = rng.randbytes(len(block[c - pos : c - pos + n]))
            if pos <= insert_at < pos + len(block):
                k = insert_at - pos
                block[k:k] = rng.randbytes(64 * 1024)
            fb.write(block)
            pos += min(BLOCK, size - pos)
    (a / "config.ini").write_text("".join(f"key{i} = {i}\n" for i in range(2000)))
    (b / "config.ini").write_text("".join(f"key{i} = {i * (i % 97 != 0)}\n" for i in range(2000)))
    return f"synthetic {size >> 20} MiB pack, {edits} edits + 1 insertion", a, b


# -- reference tools --------------------------------------------------------------------------


def changed_files(a: Path, b: Path) -> list[tuple[Path | None, Path]]:
    out: list[tuple[Path | None, Path]] = []
    for new in sorted(p for p in b.rglob("*") if p.is_file()):
        old = a / new.relative_to(b)
        if not old.is_file():
            out.append((None, new))
        elif old.stat().st_size != new.stat().st_size or not _same(old, new):
            out.append((old, new))
    return out


def _same(x: Path, y: Path) -> bool:
    with open(x, "rb") as fx, open(y, "rb") as fy:
        while True:
            bx, by = fx.read(BLOCK), fy.read(BLOCK)
            if bx != by:
                return False
            if not bx:
                return True


def zstd_bytes(a: Path, b: Path) -> int | None:
    if shutil.which("zstd") is None:
        return None
    total = 0
    for old, new in changed_files(a, b):
        size = max(new.stat().st_size, old.stat().st_size if old else 0)
        long = f"--long={min(31, max(27, size.bit_length()))}"
        cmd = ["zstd", "-19", long, "-q", "-c", str(new)]
        if old is not None:
            cmd.insert(1, f"--patch-from={old}")
            cmd.insert(1, f"--memory={max(size * 2, 1 << 27)}")
        out = subprocess.run(cmd, check=True, capture_output=True).stdout
        total += len(out)
    return total


def rsync_literal(a: Path, b: Path, work: Path) -> int | None:
    if shutil.which("rsync") is None:
        return None
    copy = work / "rsync-target"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(a, copy)
    out = subprocess.run(
        ["rsync", "-a", "--no-whole-file", "--stats", f"{b}/", f"{copy}/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    shutil.rmtree(copy)
    m = re.search(r"Literal data: ([\d,]+) bytes", out)
    return int(m.group(1).replace(",", "")) if m else None


def apply_speed(cdn: Path, app: str) -> tuple[float, float, int]:
    """MB/s of patch output (decode + blake3 of every chunk), over build 2's patches from
    build 1, by wall time and by this process's CPU time (the machine is shared: CPU time
    says what it costs unloaded); and the output bytes measured."""
    m1 = M.parse_signed((cdn / layout.manifest_path(app, 1)).read_bytes()).manifest
    m2 = M.parse_signed((cdn / layout.manifest_path(app, 2)).read_bytes()).manifest
    pack_path = cdn / layout.patch_pack_path(app, 2)
    if not m2.patches:
        return 0.0, 0.0, 0
    where = {c.id: (f.path, c.offset, c.length) for f, c in m1.iter_chunks()}
    files = cdn / layout.release_dir(app, 1) / "files"
    seconds, cpu, out_bytes = 0.0, 0.0, 0
    with open(pack_path, "rb") as pack:
        for p in m2.patches:
            base = bytearray()
            for cid, _ in p.base_chunks:
                path, offset, length = where[cid]
                with open(files / path, "rb") as f:
                    f.seek(offset)
                    base += f.read(length)
            pack.seek(p.offset)
            data = pack.read(p.size)
            _, chunks = result_chunks(m2, p)
            n = sum(c.length for c in chunks)
            t0, c0 = time.perf_counter(), time.process_time()
            split_verified(apply_patch(data, bytes(base), n), chunks)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            out_bytes += n
    wall = out_bytes / seconds / 1e6 if seconds else 0.0
    return wall, (out_bytes / cpu / 1e6 if cpu else wall), out_bytes


# -- one pair ---------------------------------------------------------------------------------


def bench_pair(
    name: str, a: Path, b: Path, work: Path, key: Path, pub: str, reference: bool = True
) -> dict[str, Any]:
    app = re.sub(r"[^A-Za-z0-9]", "-", name.split(" ")[0])[:40] or "app"
    cdn = work / f"cdn-{app}"
    common = ["--app", app, "--key", str(key), "--out", str(cdn)]
    p2pnode("publish", str(a), "--version", "1", "--build", "1", *common)
    pub2, publish_s, publish_rss = p2pnode(
        "publish", str(b), "--version", "2", "--build", "2", *common
    )
    m1 = str(cdn / layout.manifest_path(app, 1))
    m2 = str(cdn / layout.manifest_path(app, 2))
    figures: dict[str, Any] = {"pair": name, "release_bytes": pub2["bytes"]}
    for label, extra in (("patches", []), ("chunks", ["--no-patches"])):
        dest = work / f"inst-{app}-{label}"
        p2pnode("install", m1, "--dest", str(dest), "--trust", pub)
        up, seconds, rss = p2pnode("update", m2, "--dest", str(dest), *extra)
        if changed_files(b, dest) or changed_files(dest, b):
            raise SystemExit(f"{name}: the update ({label}) did not produce the new release")
        fetched = up["bytes_cdn"] + up["bytes_patches"] + up["bytes_peers"]
        figures[f"update_bytes_{label}"] = fetched
        figures[f"update_seconds_{label}"] = round(seconds, 2)
        figures[f"update_rss_mb_{label}"] = round(rss / 2**20, 1)
        if label == "patches":
            figures["patches_applied"] = up["patches"]["applied"]
            figures["methods"] = _count(up["methods"])
        shutil.rmtree(dest)
        shutil.rmtree(dest.parent / f".{dest.name}.p2pnode", ignore_errors=True)
    figures["rsync_literal_bytes"] = rsync_literal(a, b, work) if reference else None
    figures["zstd_patch_from_bytes"] = zstd_bytes(a, b) if reference else None
    figures["publish_seconds"] = round(publish_s, 2)
    figures["publish_rss_mb"] = round(publish_rss / 2**20, 1)
    figures["patch_generation"] = pub2.get("patches")
    speed, speed_cpu, measured = apply_speed(cdn, app)
    figures["apply_mb_per_s"] = round(speed, 1)
    figures["apply_mb_per_cpu_s"] = round(speed_cpu, 1)
    figures["apply_measured_bytes"] = measured
    z = figures["zstd_patch_from_bytes"]
    figures["ratio_to_zstd"] = round(figures["update_bytes_patches"] / z, 2) if z else None
    shutil.rmtree(cdn)
    return figures


def _count(methods: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for how in methods.values():
        out[how] = out.get(how, 0) + 1
    return out


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", nargs="*", default=DEFAULT_PAIRS, metavar="PKG:V1:V2")
    ap.add_argument("--synthetic-size", default="256M", help="0 to skip (e.g. 4G)")
    ap.add_argument("--edits", type=int, default=40, help="scattered edits in the synthetic pack")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip rsync and zstd (zstd -19 takes many minutes on a multi-GiB pack)",
    )
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-delta-"))
    work.mkdir(parents=True, exist_ok=True)
    key = work / "key.pem"
    k = keys.generate_key()
    keys.save_private_key(k, key)
    pub = keys.format_public_key(keys.public_key_bytes(k))
    results = []
    try:
        pairs = [wheel_pair(spec, work) for spec in args.pairs]
        size = parse_size(args.synthetic_size)
        if size:
            pairs.append(synthetic_pair(work, size, args.edits))
        for name, a, b in pairs:
            r = bench_pair(name, a, b, work, key, pub, not args.no_reference)
            results.append(r)
            print(
                f"{name}: release {_mb(r['release_bytes'])}; update with patches "
                f"{_mb(r['update_bytes_patches'])}, without {_mb(r['update_bytes_chunks'])}; "
                f"rsync {_mb(r['rsync_literal_bytes'])}; zstd -19 --patch-from "
                f"{_mb(r['zstd_patch_from_bytes'])} (x{r['ratio_to_zstd']}); publish "
                f"{r['publish_seconds']}s {r['publish_rss_mb']} MB RSS; update "
                f"{r['update_seconds_patches']}s {r['update_rss_mb_patches']} MB RSS; apply "
                f"{r['apply_mb_per_s']} MB/s ({r['apply_mb_per_cpu_s']} per CPU second)",
                flush=True,
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ok_bytes = all(r["ratio_to_zstd"] <= 1.5 for r in results if r["ratio_to_zstd"] is not None)
    ok_speed = all(r["apply_mb_per_cpu_s"] >= 200 for r in results if r["apply_measured_bytes"])
    summary = {
        "pairs": results,
        "target_bytes_met": ok_bytes,
        "target_apply_met": ok_speed,
        "load_average": [round(x, 2) for x in os.getloadavg()],  # the machine is shared
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
