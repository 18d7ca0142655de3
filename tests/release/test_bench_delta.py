"""A smoke check of scripts/bench_delta.py's parts on a tiny synthetic pair, in process (the
script itself runs the CLI in child processes for minutes; it is run by hand, not here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from p2pnode.release.publish import publish
from tests.support.release import KEY

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_delta.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_delta", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_delta"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_delta_parts_on_a_tiny_pair(tmp_path: Path) -> None:
    bench = _script()
    _, a, b = bench.synthetic_pair(tmp_path, 1 << 20, 2)
    changed = [new.relative_to(b).as_posix() for _, new in bench.changed_files(a, b)]
    assert changed == ["config.ini", "data/pack.bin"]
    for build, src in ((1, a), (2, b)):
        publish(src, app="s", version=str(build), build=build, key=KEY, out=tmp_path / "cdn")
    wall, per_cpu, measured = bench.apply_speed(tmp_path / "cdn", "s")
    assert measured > 0 and wall > 0 and per_cpu > 0
    zstd = bench.zstd_bytes(a, b)
    assert zstd is None or 0 < zstd < 200_000
