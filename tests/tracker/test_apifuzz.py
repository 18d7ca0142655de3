"""Schema-driven fuzzing of the whole tracker HTTP API (issue 18): schemathesis reads
``/openapi.json`` from a real tracker served by hypercorn on loopback and runs every check
(status codes, content types, response schemas and headers, no 5xx, valid requests accepted and
invalid ones refused, authentication enforced) over every operation, with the admin token.

Bounded to a few examples per operation and a fixed seed, so the suite stays quick and a failure
reproduces; ``bash scripts/apifuzz`` is the long run (more examples, a random seed, every
phase). The tracker is seeded first (an app with a publisher key, two builds, a rollout, an
announce and an outcome) so the fuzzer's requests reach past "not found"."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.release import keys
from p2pnode.release import manifest as M
from tests.support.tracker import ADMIN, APP
from tracker import Tracker, serve_tracker

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
#: examples per operation and phases; scripts/apifuzz raises them
EXAMPLES = int(os.environ.get("APIFUZZ_EXAMPLES", "6"))
PHASES = os.environ.get("APIFUZZ_PHASES", "examples,fuzzing,stateful")
SEED = os.environ.get("APIFUZZ_SEED", "18")
MAX_TIME = os.environ.get("APIFUZZ_MAX_TIME", "")


async def seed(http: TrackerClient, make_manifest: Callable[..., M.SignedManifest]) -> None:
    """Data for the fuzzer to find: two builds on stable (the second in a rollout), a node
    that announced the first and reported installing it."""
    one, two = make_manifest(1), make_manifest(2)
    await http.publish(APP, "stable", one.encode())
    await http.publish(APP, "stable", two.encode(), rollout=10)
    node = keys.generate_key()
    await http.announce(node, app=APP, manifest_id=one.id, port=0)
    fields = {"app": APP, "manifest": one.id.hex(), "kind": "install", "outcome": "success"}
    await http.report_outcome(node, {**fields, "to_build": 1})


async def fuzz(url: str, cwd: Path) -> tuple[int, str]:
    """Run the schemathesis CLI against ``url``: its exit code and report."""
    args = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(HERE / "apifuzz.toml"),
        "--no-color",
        "run", f"{url}/openapi.json",
        "--max-examples", str(EXAMPLES),
        "--phases", PHASES,
        "--header", f"Authorization: Bearer {ADMIN}",
    ]  # fmt: skip
    if SEED != "random":
        args += ["--seed", SEED, "--generation-deterministic"]
    if MAX_TIME:
        args += ["--max-time", MAX_TIME]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.apifuzz_hooks", "APIFUZZ_APP": APP}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = await trio.run_process(
        args, capture_stdout=True, stderr=subprocess.STDOUT, env=env, check=False, cwd=cwd
    )
    return proc.returncode, proc.stdout.decode(errors="replace")


async def test_the_fuzzer_finds_nothing_wrong_with_the_tracker_api(
    tracker: Tracker,
    client: TrackerClient,
    make_manifest: Callable[..., M.SignedManifest],
    tmp_path: Path,
) -> None:
    await seed(client, make_manifest)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        host, port = await nursery.start(
            functools.partial(serve_tracker, tracker, "127.0.0.1", 0, shutdown=stop)
        )
        code, report = await fuzz(f"http://{host}:{port}", tmp_path)
        stop.set()
    print(report)  # shown with -s, and on failure
    assert code == 0, report
