"""The demo's second half: clients as they run on a player's machine, one ``p2pnode daemon`` each.

Two daemon processes (their own ``--state`` dir each, so two nodes, ``--listen`` on loopback)
are driven only through the command line's client verbs, as a user or a launcher would
(``p2pnode settings``, ``add``, ``jobs``, ``pause``, ``resume``, ``web``, each with ``--json``).
Daemon A installs one game, then gets ``max_active 1`` and a download cap (the queue is then
visible for seconds without big files), takes two more games (one downloads, one waits),
pauses the first and resumes it, and is overtaken by a critical build of its first game
published meanwhile: the critical update installs before the normal job that was queued
earlier. Daemon B installs that first game from daemon A's port (bytes from peers). The demo
ends with the web page's URL (``p2pnode web`` prints it with a login token).

What the daemons print (``--json``: one event a line) tells the demo when something happened;
what the verbs answer is what it shows.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from ..errors import DemoError
from ..release import keys
from ..release.metadata import ReleaseInfo, UpdateType

__all__ = ["DaemonDemo", "daemon_demo"]

#: The games daemon A holds: the first is installed at full speed (and then updated by a
#: critical build); the two others go through the queue under ``RATE`` (sizes in bytes).
FIRST = "demo-arcade"
QUEUED = (("demo-puzzle", 6 << 20), ("demo-racer", 3 << 20))
FIRST_SIZE = 3 << 20
#: Daemon A's download cap while the queue runs: the queued games take ~12 s and ~6 s, so the
#: first is still downloading after the two client verbs' round trips (each a Python start,
#: several seconds on a loaded box) that come before its pause.
RATE = "512K"
#: Seconds the demo waits for any one thing a daemon does.
WAIT = 120.0
#: Seconds the demo waits for the tracker to list daemon A's first game.
LISTED_WAIT = 10.0

#: Publishes a build of ``app`` (its files in ``src``) to the CDN and the tracker.
Publish = Callable[[Path, str, int, ReleaseInfo | None], Awaitable[None]]


def make_game(root: Path, app: str, size: int, seed: int) -> None:
    """A small game: one incompressible pack and a readme."""
    rng = random.Random(f"{app}-{seed}")
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "game.pak").write_bytes(rng.randbytes(size))
    (root / "README.txt").write_text(f"{app}: a sample game published by `p2pnode demo`.\n")


def _child_env(work: Path) -> dict[str, str]:
    """The verbs and daemons run this copy of p2pnode, with a config of their own (empty: no
    user config leaks in), and no state dir but the one each command names."""
    here = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x)
    config = work / "daemon-config.toml"
    config.touch()
    env["P2PNODE_CONFIG"] = str(config)
    return env


class _Daemon:
    """One ``p2pnode daemon --json`` process and its events."""

    def __init__(self, name: str, state: Path, env: dict[str, str]) -> None:
        self.name = name
        self.state = state
        self.env = env
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self.proc: trio.Process | None = None
        self.ended = False  # its output ended: it exited

    async def start(self, nursery: trio.Nursery) -> None:
        argv = [sys.executable, "-m", "p2pnode", "daemon", "--state", str(self.state)]
        argv += ["--listen", "127.0.0.1:0", "--json"]
        self.proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env
        )
        nursery.start_soon(self._read)
        await self.event("started")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        async for data in self.proc.stdout:
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self.events.append({**event, "at": time.monotonic()})
            self._changed.set()
            self._changed = trio.Event()
        self.ended = True
        self._changed.set()

    async def event(self, kind: str, **match: Any) -> dict[str, Any]:
        """The first event of ``kind`` (whose fields include ``match``), waiting for it."""
        with trio.fail_after(WAIT):
            while True:
                for e in self.events:
                    if e.get("event") == kind and all(e.get(k) == v for k, v in match.items()):
                        return e
                if self.ended:
                    raise DemoError(f"daemon {self.name} exited before its {kind} event")
                await self._changed.wait()

    async def verb(self, *args: str) -> Any:
        """``p2pnode VERB ... --state STATE --json``: its answer."""
        argv = [sys.executable, "-m", "p2pnode", *args, "--state", str(self.state), "--json"]
        with trio.fail_after(WAIT):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                          check=False, env=self.env)  # fmt: skip
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()
            raise DemoError(f"`p2pnode {' '.join(args)}` on daemon {self.name} failed: {said}")
        return json.loads(done.stdout)

    async def jobs(self) -> dict[str, dict[str, Any]]:
        return {j["id"]: j for j in (await self.verb("jobs"))["jobs"]}

    async def stop(self) -> None:
        """SIGTERM, as systemd stops it; killed if it does not exit in 10 s."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await self.proc.wait()
                return
            self.proc.kill()
            await self.proc.wait()


class DaemonDemo:
    """What the daemon half showed (``as_json`` for ``p2pnode demo --json``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.queue: dict[str, str] = {}  # app -> state, right after the two adds
        self.paused: dict[str, str] = {}  # app -> state, right after the pause
        self.resumed = ""  # the paused job's state after resume
        self.installed: dict[str, list[str]] = {}  # daemon -> apps installed (jobs, in order)
        self.critical_overtook = False
        self.peer_bytes = 0  # daemon B's bytes of the first game from peers (daemon A)
        self.web = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "paused": self.paused,
            "resumed": self.resumed,
            "installed": self.installed,
            "critical_overtook": self.critical_overtook,
            "peer_bytes": self.peer_bytes,
            "web": self.web,
        }


def _sources(job: dict[str, Any]) -> dict[str, int]:
    got = job.get("progress", {}).get("by_source", {})
    return {
        "bytes_peers": got.get("peers", 0),
        "bytes_cdn": got.get("cdn", 0),
        "bytes_reused": got.get("local", 0),
    }


async def _listed(tracker_url: str, app: str) -> None:
    """Wait (at most ``LISTED_WAIT``) until the tracker lists a seeder of ``app``, so that the
    other daemon is handed it as a peer."""
    async with httpx.AsyncClient() as http:
        with trio.move_on_after(LISTED_WAIT):
            while True:
                stats = (await http.get(tracker_url + "/v1/stats")).json()
                if any(r["app"] == app and r["seeders"] > 0 for r in stats["releases"]):
                    return
                await trio.sleep(0.1)


def _seconds(job: dict[str, Any], since: float) -> float:
    return max(0.0, (job.get("finished") or since) - since)


@asynccontextmanager
async def daemon_demo(
    work: Path,
    tracker_url: str,
    publisher: Any,
    publish: Publish,
    say: Callable[[str], None],
) -> AsyncIterator[DaemonDemo]:
    """Run the daemon half; the daemons keep running (the web page with them) until the block
    ends. ``publish(src, app, build, info)`` publishes a build through the tracker."""
    out = DaemonDemo()
    trust = keys.format_public_key(keys.public_key_bytes(publisher))
    env = _child_env(work)
    a = _Daemon("A", work / "daemon-a" / "state", env)
    b = _Daemon("B", work / "daemon-b" / "state", env)
    srcs = {FIRST: work / "games" / FIRST}
    make_game(srcs[FIRST], FIRST, FIRST_SIZE, 1)
    await publish(srcs[FIRST], FIRST, 1, None)
    for app, size in QUEUED:
        srcs[app] = work / "games" / app
        make_game(srcs[app], app, size, 1)
        await publish(srcs[app], app, 1, None)

    async def add(d: _Daemon, app: str) -> dict[str, Any]:
        dest = str(work / f"daemon-{d.name.lower()}" / "games" / app)
        return dict(
            await d.verb("add", app, "--tracker", tracker_url, "--trust", trust, "--dest", dest)
        )

    async with trio.open_nursery() as nursery:
        try:
            async with trio.open_nursery() as starting:  # both at once: two Python starts
                for d in (a, b):
                    starting.start_soon(d.start, nursery)
            say(f"daemons A and B running ({a.state}, {b.state})")

            # A: the first game at full speed; it serves it from its port once installed.
            t_first = time.time()
            first = await add(a, FIRST)
            await a.event("installed", entry=first["entry"]["id"])

            # A: one download at a time, capped.
            await a.verb("settings", "max_active", "1")
            await a.verb("settings", "max_download_rate", RATE)
            # B: the first game, from A's port (A lists it on the tracker once installed).
            await _listed(tracker_url, FIRST)
            t_b = time.time()
            from_a = await add(b, FIRST)
            # A: two more games: one downloads, one waits.
            t_queue = time.time()
            one = await add(a, QUEUED[0][0])
            await a.event("job-started", job=one["id"])
            two = await add(a, QUEUED[1][0])
            jobs = await a.jobs()
            out.queue = {jobs[j["id"]]["app"]: jobs[j["id"]]["state"] for j in (one, two)}
            say(f"daemon A (max_active 1, {RATE}/s): {out.queue}")

            # A: pause the download, the waiting game starts; resume: back in line.
            await a.verb("pause", one["id"])
            await a.event("job-started", job=two["id"])
            jobs = await a.jobs()
            out.paused = {jobs[j["id"]]["app"]: jobs[j["id"]]["state"] for j in (one, two)}
            out.resumed = (await a.verb("resume", one["id"]))["state"]
            say(f"daemon A after pause: {out.paused}; after resume: {out.resumed}")

            # A critical build of the first game: it jumps the queue, ahead of the waiting job.
            (srcs[FIRST] / "data" / "hotfix.txt").write_text("Build 2: a critical fix.\n")
            t_critical = time.time()
            await publish(srcs[FIRST], FIRST, 2, ReleaseInfo(update_type=UpdateType.CRITICAL))
            update = await a.event("update-queued", entry=first["entry"]["id"])
            for j in (one, two):
                await a.event("installed", entry=j["entry"]["id"])
            await a.event("installed", entry=first["entry"]["id"], build=2)
            await b.event("installed", entry=from_a["entry"]["id"])

            jobs = await a.jobs()
            done = sorted(jobs.values(), key=lambda j: j.get("finished") or math.inf)
            out.installed["A"] = [j["app"] for j in done if j["state"] == "installed"]
            crit = jobs[update["job"]]
            out.critical_overtook = bool(crit["critical"]) and (crit["finished"] or math.inf) < (
                jobs[one["id"]]["finished"] or math.inf
            )
            b_jobs = await b.jobs()
            got = b_jobs[from_a["id"]]
            out.peer_bytes = _sources(got)["bytes_peers"]
            out.installed["B"] = [j["app"] for j in b_jobs.values() if j["state"] == "installed"]
            if not out.peer_bytes:
                raise DemoError("daemon B got nothing from daemon A's port")

            rows = [
                (f"daemon A: {FIRST}", jobs[first["id"]], t_first, "client verbs: add; full speed"),
                (f"daemon A: {QUEUED[0][0]}", jobs[one["id"]], t_queue,
                 f"max_active 1, {RATE}/s; paused, resumed; waited for the critical update"),
                (f"daemon A: {QUEUED[1][0]}", jobs[two["id"]], t_queue,
                 "queued behind it; ran while it was paused"),
                (f"daemon A: {FIRST} build 2", crit, t_critical,
                 "critical, from its publish: jumped the queue"),
                (f"daemon B: {FIRST}", got, t_b, "from daemon A's port"),
            ]  # fmt: skip
            for step, job, since, note in rows:
                seconds = _seconds(job, since)
                out.rows.append({"step": step, **_sources(job), "seconds": round(seconds, 2),
                                 "note": note})  # fmt: skip
            out.web = (await a.verb("web"))["url"]
            yield out
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stopping:
                    for d in (a, b):
                        stopping.start_soon(d.stop)
            nursery.cancel_scope.cancel()
