#!/usr/bin/env python3
"""Manifest scale: build, sign, parse, verify and plan a synthetic 10 GiB release.

10 GiB at 1 MiB average chunks is ~10,000 chunks; the release is spread over 5,000 files (a game
with many assets). Target: parse + verify + plan well under a second. The last line is JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pnode.release import keys
from p2pnode.release import manifest as M


def main(total_gib: int = 10, files: int = 5000) -> None:
    key = keys.generate_key()
    chunks_total = total_gib * 1024
    per_file = max(1, chunks_total // files)
    entries = []
    for i in range(files):
        cs = tuple(M.ChunkRef(os.urandom(32), j << 20, 1 << 20) for j in range(per_file))
        entries.append(M.FileEntry(f"assets/{i % 97}/file{i}.pak", per_file << 20, 0o644, cs))
    now = int(time.time())
    m = M.Manifest(
        app="big",
        version="1",
        build=1,
        channel="stable",
        created=now,
        expires=now + 3600,
        key=keys.public_key_bytes(key),
        files=tuple(entries),
    )
    t = time.perf_counter()
    blob = M.sign(m, key).encode()
    sign_s = time.perf_counter() - t
    t = time.perf_counter()
    signed = M.parse_signed(blob)
    parse_s = time.perf_counter() - t
    t = time.perf_counter()
    got = M.verify(signed, {keys.public_key_bytes(key)})
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    # Plan: which unique chunks are needed given half of them are already local.
    unique = got.unique_chunks()
    local = set(list(unique)[::2])
    needed = {cid: n for cid, n in unique.items() if cid not in local}
    plan_s = time.perf_counter() - t
    print(
        f"manifest: {len(blob) / 1e6:.2f} MB, {files} files, {len(unique)} chunks, "
        f"{m.total_size / 2**30:.1f} GiB"
    )
    print(
        f"sign {sign_s * 1e3:.0f} ms, parse {parse_s * 1e3:.0f} ms, verify {verify_s * 1e3:.0f} "
        f"ms, plan {plan_s * 1e3:.0f} ms ({len(needed)} chunks to fetch)"
    )
    print(
        json.dumps(
            {
                "manifest_bytes": len(blob),
                "chunks": len(unique),
                "parse_verify_plan_s": round(parse_s + verify_s + plan_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
