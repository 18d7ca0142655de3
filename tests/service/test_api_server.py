"""The local API served by hypercorn on a free loopback port: the push stream, the Host and
token checks over real HTTP, api.json, and the client verbs (`p2pnode add`, `jobs`, ...) as
processes against it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pnode.disk.state import InstallState
from p2pnode.disk.state import StateDir as InstallDir
from p2pnode.service import events
from p2pnode.service.api import serve_api
from p2pnode.service.control import Service
from p2pnode.service.job import JobState, Progress
from p2pnode.service.statedir import StateDir

KEY = "ed25519:" + "ab" * 32


class Served:
    def __init__(self, service: Service, port: int, root: Path) -> None:
        self.service, self.port, self.root = service, port, root
        self.url = f"http://127.0.0.1:{port}"
        self.token = service.state.api_token()
        self.auth = {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    state = StateDir(tmp_path / "state")
    state.lock()
    service = Service.open(state, {}, "config.toml", local_now=lambda: datetime(2026, 12, 2, 12))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_api, service, "127.0.0.1", 0, state.api_token())
        yield Served(service, port, tmp_path)
        nursery.cancel_scope.cancel()
    assert not state.api_file.exists()  # removed on the way out


async def read_events(
    url: str, auth: dict[str, str], n: int, timeout: float, *, within: float | None = None
) -> list[str]:
    """The first ``n`` SSE blocks (events and comments) of the stream, raw; with ``within``,
    every block that arrives in that many seconds (at most ``n``)."""
    blocks: list[str] = []
    async with (
        httpx.AsyncClient(headers=auth, timeout=timeout) as c,
        c.stream("GET", f"{url}/api/v1/events") as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        buf = ""
        with trio.move_on_after(within or math.inf), trio.fail_after(timeout):
            async for chunk in r.aiter_text():
                buf += chunk
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    blocks.append(block)
                if len(blocks) >= n:
                    return blocks
    return blocks


def data_of(block: str) -> dict[str, Any]:
    line = next(ln for ln in block.splitlines() if ln.startswith("data:"))
    doc: dict[str, Any] = json.loads(line[5:])
    return doc


async def test_api_json_names_the_server(served: Served) -> None:
    assert served.service.state.api_address() == served.url


async def test_host_check_and_token_over_http(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as c:
        for host in (
            f"127.0.0.1:{served.port}",
            f"localhost:{served.port}",
            f"[::1]:{served.port}",
        ):
            r = await c.get("/api/v1/jobs", headers={**served.auth, "Host": host})
            assert r.status_code == 200, host
        for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1:1", "localhost"):
            r = await c.get("/api/v1/jobs", headers={**served.auth, "Host": host})
            assert r.status_code == 403, host
        r = await c.post("/api/v1/settings", json={"max_active": 4})
        assert r.status_code in (401, 405)
        r = await c.patch("/api/v1/settings", json={"max_active": 4})
        assert r.status_code == 401 and served.service.queue.max_active == 1
        r = await c.patch("/api/v1/settings", json={"max_active": 4}, headers=served.auth)
        assert r.status_code == 200 and served.service.queue.max_active == 4


async def test_events_snapshot_then_changes_coalesced(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "MIN_INTERVAL", 0.5)
    svc = served.service
    got: list[str] = []

    async def listen() -> None:
        got.extend(await read_events(served.url, served.auth, 100, 10, within=3.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await trio.sleep(0.3)  # connected, snapshot sent
        svc.add("game", str(served.root / "g"), [KEY], tracker="http://127.0.0.1:1")
        (start,) = svc.next_actions().actions
        t0 = trio.current_time()
        for n in range(200):  # a busy worker: 200 reports in about a second
            svc.report("j1", start.attempt, progress=Progress(n, 1000, 10.0))
            await trio.sleep(0.005)
        busy = trio.current_time() - t0
        svc.report("j1", start.attempt, phase=JobState.VERIFYING)
    assert got[0].startswith("retry:")
    first, *later = [data_of(b) for b in got[1:]]
    assert first["jobs"] == []
    assert later[-1]["jobs"][0]["state"] == "verifying"  # the last change is never lost
    # 200 changes over a second or more came as one snapshot per 0.5 s, not 200
    assert busy >= 1.0 and len(later) <= busy / 0.5 + 2, (busy, len(later))


async def test_keepalive_comment_while_nothing_changes(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "KEEPALIVE", 0.2)
    blocks = await read_events(served.url, served.auth, 4, 5)
    assert blocks[2] == ": keepalive" and blocks[3] == ": keepalive"


async def test_events_need_the_token(served: Served) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{served.url}/api/v1/events")
        assert r.status_code == 401


def p2pnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pnode", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: p2pnode(*args, env=env))


async def test_client_verbs_end_to_end(served: Served) -> None:
    state = ["--state", str(served.root / "state"), "--json"]
    dest = served.root / "games" / "a"
    r = await run(
        "add",
        "game",
        "--dest",
        str(dest),
        "--trust",
        KEY,
        "--tracker",
        "http://127.0.0.1:1",
        "--priority",
        "low",
        *state,
    )
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    assert added["ok"] and added["id"] == "j1" and added["entry"]["id"] == "g1"
    r = await run(
        "add",
        "other",
        "--dest",
        str(served.root / "games" / "b"),
        "--trust",
        KEY,
        "--tracker",
        "http://127.0.0.1:1",
        *state,
    )
    assert json.loads(r.stdout)["id"] == "j2"
    jobs = json.loads((await run("jobs", *state)).stdout)["jobs"]
    assert [j["id"] for j in jobs] == ["j2", "j1"]
    assert all({"id", "app", "state", "bytes_done", "bytes_total", "rate"} <= set(j) for j in jobs)
    r = await run("jobs", *state[:2])  # for people: a table
    assert r.returncode == 0 and "other" in r.stdout and "queued" in r.stdout, r.stderr
    r = await run("priority", "j1", "top", *state)
    assert json.loads(r.stdout)["priority"] == "high"
    assert json.loads((await run("pause", "j2", *state)).stdout)["state"] == "paused"
    assert json.loads((await run("resume", "g2", *state)).stdout)["state"] == "queued"
    r = await run("settings", "max_download_rate", "40M", *state)
    assert json.loads(r.stdout)["value"] == 40 << 20
    assert served.service.caps().download == 40 << 20
    r = await run("settings", *state)
    assert json.loads(r.stdout)["max_download_rate"] == 40 << 20
    # through $P2PNODE_API and the token file, not api.json
    r = await run(
        "jobs", "--json", "--state", str(served.root / "state"), env={"P2PNODE_API": served.url}
    )
    assert r.returncode == 0, r.stderr
    # refusals: the daemon's message and fix, exit 2, nothing changed
    r = await run("cancel", "j9", *state)
    out = json.loads(r.stdout)
    assert r.returncode == 2 and "no job" in out["error"] and out["fix"]
    r = await run("settings", "max_active", "0", *state)
    assert r.returncode == 2 and served.service.queue.max_active == 1
    r = await run("jobs", "--json", "--api", served.url, env={"P2PNODE_API_TOKEN": "wrong-token"})
    assert r.returncode == 2 and "token" in json.loads(r.stdout)["error"]
    # the standalone verbs refuse a DEST the daemon manages
    env = {"P2PNODE_STATE": str(served.root / "state")}
    r = await run("verify", "--dest", str(dest / "sub"), "--json", env=env)
    assert r.returncode == 2 and "managed by the p2pnode daemon" in json.loads(r.stdout)["error"]
    r = await run("install", "http://127.0.0.1:1/m", "--dest", str(dest), "--json", env=env)
    assert r.returncode == 2 and "g1" in r.stderr and "p2pnode jobs" in r.stderr
    # move: by DEST or id; a refusal says why and queues nothing
    served.service.pause("j1")  # g1's install job stands for a finished one: cancel it
    served.service.cancel("j1")
    dest.mkdir(parents=True)
    InstallDir(dest).create()
    InstallDir(dest).save(InstallState(app="game", current="00" * 32))
    (served.root / "full").mkdir()
    (served.root / "full" / "save").write_text("x")
    r = await run("move", "g1", "--to", str(served.root / "full"), *state)
    assert r.returncode == 2 and "not empty" in json.loads(r.stdout)["error"], r.stderr
    r = await run("move", str(dest), "--to", str(served.root / "elsewhere"), *state)
    moved = json.loads(r.stdout)
    assert r.returncode == 0 and moved["kind"] == "move" and moved["entry"] == "g1", r.stderr
    assert moved["target"] == str(served.root / "elsewhere")
    # web: the page's login URL
    url = json.loads((await run("web", *state)).stdout)["url"]
    assert url == f"{served.url}/?token={served.token}"


async def test_jobs_watch_streams_snapshots(served: Served) -> None:
    served.service.add("game", str(served.root / "g"), [KEY], tracker="http://127.0.0.1:1")
    cmd = [
        sys.executable,
        "-m",
        "p2pnode",
        "jobs",
        "--watch",
        "--json",
        "--state",
        str(served.root / "state"),
    ]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(65536)
        first = json.loads(line.splitlines()[0])
        assert first["event"] == "snapshot" and first["jobs"][0]["app"] == "game"
    finally:
        proc.kill()
        await proc.wait()


async def test_unix_socket(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.lock()
    service = Service.open(state, {}, "config.toml")
    sock = tmp_path / "api.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_api, service, f"unix:{sock}", 0, state.api_token())
        assert state.api_address() == f"http+unix:{sock}"
        r = await run("settings", "max_active", "3", "--state", str(tmp_path / "state"), "--json")
        assert r.returncode == 0, r.stderr
        assert service.queue.max_active == 3
        nursery.cancel_scope.cancel()


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    r = p2pnode("jobs", "--state", str(tmp_path / "none"), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and "no daemon is running on" in out["error"]
    assert "p2pnode daemon" in out["fix"]
    (tmp_path / "stale").mkdir()
    StateDir(tmp_path / "stale").write_api_address("http://127.0.0.1:9")  # a kill -9's leftover
    r = p2pnode("pause", "j1", "--state", str(tmp_path / "stale"), "--json")
    assert r.returncode == 1 and "no daemon is running on" in json.loads(r.stdout)["error"]
