"""The README's main job: a whole release cycle on loopback, printing what came from where.

Publishes a sample game to a directory served by a real nginx, installs it over HTTP, publishes
a second build that changes one region of a large file, updates (fetching only new chunks),
verifies, damages a byte and repairs it, then stops nginx and rolls back offline.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from . import keys
from .install import InstallOptions, InstallResult, install, rollback
from .localcdn import LocalCDN
from .publish import publish
from .units import format_bytes
from .verify import verify

__all__ = ["run_demo"]


def _make_release(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    launcher = root / "bin" / "launch.sh"
    launcher.write_text("#!/bin/sh\necho 'Starting the demo game'\n")
    launcher.chmod(0o755)
    (root / "README.txt").write_text("A sample release published by `p2pnode demo`.\n")
    for name, size in (
        ("levels.pak", 24 << 20),
        ("textures.pak", 12 << 20),
        ("audio.pak", 6 << 20),
    ):
        (root / "data" / name).write_bytes(rng.randbytes(size))


def _change_one_region(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    at = len(data) // 3
    data[at : at + 300_000] = rng.randbytes(300_000)
    path.write_bytes(bytes(data))


def _row(step: str, r: InstallResult | None, seconds: float, note: str = "") -> dict[str, Any]:
    return {
        "step": step,
        "bytes_cdn": r.bytes_cdn if r else 0,
        "bytes_reused": r.bytes_reused if r else 0,
        "seconds": round(seconds, 2),
        "note": note,
    }


def run_demo(workdir: Path | None = None, *, json_mode: bool = False) -> dict[str, Any]:
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="p2pnode-demo-")) if workdir is None else workdir
    if workdir is not None and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if json_mode else print
    rows: list[dict[str, Any]] = []
    try:
        key = keys.generate_key()
        trust = [keys.public_key_bytes(key)]
        src, cdn_dir, dest = work / "release", work / "cdn", work / "install"
        _make_release(src, 1)
        t = time.monotonic()
        p1 = publish(src, app="demo-game", version="1.0.0", build=1, key=key, out=cdn_dir)
        say(
            f"published demo-game 1.0.0: {len(p1.manifest.files)} files, "
            f"{format_bytes(p1.manifest.total_size)} -> {cdn_dir}"
        )
        rows.append(_row("publish build 1", None, time.monotonic() - t))
        with LocalCDN(cdn_dir) as cdn:
            say(f"nginx serves {cdn_dir} at {cdn.url}")
            url1 = cdn.url + p1.manifest_path
            t = time.monotonic()
            r = trio.run(install, url1, dest, trust, InstallOptions())
            rows.append(_row("install build 1", r, time.monotonic() - t, "fresh install"))

            _change_one_region(src / "data" / "levels.pak", 2)
            (src / "data" / "patch-notes.txt").write_text("Build 2: the third level changed.\n")
            p2 = publish(src, app="demo-game", version="1.1.0", build=2, key=key, out=cdn_dir)
            t = time.monotonic()
            r = trio.run(install, cdn.url + p2.manifest_path, dest, trust, InstallOptions())
            rows.append(
                _row("update to build 2", r, time.monotonic() - t, "delta: new chunks only")
            )

            t = time.monotonic()
            report = trio.run(lambda: verify(dest))
            rows.append(
                _row("verify", None, time.monotonic() - t, "OK" if report.ok else "DAMAGED")
            )

            victim = dest / "data" / "textures.pak"
            with open(victim, "r+b") as f:
                f.seek(5_000_000)
                b = f.read(1)
                f.seek(5_000_000)
                f.write(bytes([b[0] ^ 0xFF]))
            t = time.monotonic()
            report = trio.run(lambda: verify(dest, repair=True))
            rows.append(
                {
                    **_row(
                        "repair a flipped byte",
                        None,
                        time.monotonic() - t,
                        f"repaired {', '.join(report.repaired)}",
                    ),
                    "bytes_cdn": report.bytes_cdn,
                    "bytes_reused": report.bytes_reused,
                }
            )
        t = time.monotonic()
        r = trio.run(rollback, dest, InstallOptions())
        rows.append(_row("rollback to build 1", r, time.monotonic() - t, "nginx stopped: offline"))
        ok = (dest / "data" / "levels.pak").read_bytes() != (
            src / "data" / "levels.pak"
        ).read_bytes()
        result = {"workdir": str(work), "steps": rows, "rolled_back_ok": ok}
        if not json_mode:
            _print_table(rows)
        return result
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="p2pnode demo: where the bytes came from")
    for col in ("step", "from CDN", "reused locally", "seconds", "note"):
        table.add_column(
            col, justify="right" if col in ("from CDN", "reused locally", "seconds") else "left"
        )
    for row in rows:
        table.add_row(
            row["step"],
            format_bytes(row["bytes_cdn"]),
            format_bytes(row["bytes_reused"]),
            f"{row['seconds']:.2f}",
            row["note"],
        )
    Console().print(table)
