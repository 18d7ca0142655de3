"""The client service's daemon for tests: small games on a local CDN, a daemon run in-process
under trio, and waits on its state."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from p2pnode.demo.cdn import LocalCDN
from p2pnode.release import keys
from p2pnode.release.publish import PublishResult, publish
from p2pnode.service.daemon import DaemonOptions, Running, run_daemon
from p2pnode.service.job import Job, JobState
from tests.support.release import KEY, PUB, TEST_CHUNKING

TRUST = [keys.format_public_key(PUB)]


def game(
    tmp: Path, cdn: LocalCDN, app: str, size: int, *, build: int = 1, seed: int = 0
) -> tuple[str, PublishResult]:
    """Publish a one-file game of ``size`` random bytes; its manifest URL and the result."""
    src = tmp / f"src-{app}-{build}"
    src.mkdir(parents=True)
    rng = random.Random(f"{app}-{seed}")
    (src / "data.bin").write_bytes(rng.randbytes(size))
    (src / "readme.txt").write_text(f"{app} build {build}\n")
    pub = publish(
        src, app=app, version=f"1.{build}", build=build, key=KEY, out=cdn.root,
        chunking=TEST_CHUNKING,
    )  # fmt: skip
    return cdn.url + pub.manifest_path, pub


def sent(cdn: LocalCDN, app: str) -> int:
    """Bytes nginx wrote for ``app``'s requests (logged when each request ends)."""
    return cdn.bytes_sent(f"/{app}/")


@asynccontextmanager
async def daemon(state: Path, **options: Any) -> AsyncIterator[Running]:
    """A daemon on ``state`` for the block; cancelled (as SIGTERM would) at its end."""
    events: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            run_daemon, DaemonOptions(state, **options), events.append
        )
        yield running
        nursery.cancel_scope.cancel()


def job(running: Running, job_id: str) -> Job:
    return next(j for j in running.service.queue.jobs if j.id == job_id)


async def until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


async def installed(running: Running, *job_ids: str, timeout: float = 60.0) -> None:
    def done() -> bool:
        states = [job(running, j).state for j in job_ids]
        assert JobState.FAILED not in states, [job(running, j).error for j in job_ids]
        return all(s is JobState.INSTALLED for s in states)

    await until(done, timeout)
