"""A smoke run of scripts/bench_delta.py on a tiny synthetic pair (no package download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_delta.py"


def test_bench_delta_runs_and_ends_with_one_json_line() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--pairs", "--synthetic-size", "1M", "--edits", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    (pair,) = summary["pairs"]
    assert pair["update_bytes_patches"] < pair["update_bytes_chunks"]
    assert pair["patches_applied"] >= 1
