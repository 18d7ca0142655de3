"""Running schemathesis (the API fuzzer) against a server under test, for the tracker's and
the client daemon's HTTP APIs: its CLI in a subprocess, bounded by environment variables that
scripts/apifuzz raises for the long run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).parent.parent.parent
#: examples per operation, phases and seed; scripts/apifuzz raises them
EXAMPLES = int(os.environ.get("APIFUZZ_EXAMPLES", "4"))
PHASES = os.environ.get("APIFUZZ_PHASES", "examples,fuzzing,stateful")
SEED = os.environ.get("APIFUZZ_SEED", "18")
MAX_TIME = os.environ.get("APIFUZZ_MAX_TIME", "")


async def fuzz(
    schema_url: str, token: str, config: Path, cwd: Path, *, hooks: str | None = None
) -> tuple[int, str]:
    """Run the schemathesis CLI over the API ``schema_url`` describes, as ``token``: its exit
    code and report. ``config``: its settings file; ``hooks``: a module of hooks."""
    args = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(config),
        "--no-color",
        "run", schema_url,
        "--max-examples", str(EXAMPLES),
        "--phases", PHASES,
        "--header", f"Authorization: Bearer {token}",
    ]  # fmt: skip
    if SEED != "random":
        args += ["--seed", SEED, "--generation-deterministic"]
    if MAX_TIME:
        args += ["--max-time", MAX_TIME]
    env = dict(os.environ)
    if hooks:
        env["SCHEMATHESIS_HOOKS"] = hooks
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = await trio.run_process(
        args, capture_stdout=True, stderr=subprocess.STDOUT, env=env, check=False, cwd=cwd
    )
    return proc.returncode, proc.stdout.decode(errors="replace")
