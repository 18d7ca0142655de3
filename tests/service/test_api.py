"""The local API in process: every route against a Service on a locked temp state dir, with no
workers (the tests drive the Service's worker side themselves), and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from p2pnode.disk.state import InstallState
from p2pnode.disk.state import StateDir as InstallDir
from p2pnode.service.api import make_app
from p2pnode.service.apiguard import MAX_BODY
from p2pnode.service.apischema import BODIES, PREFIX, openapi_document
from p2pnode.service.control import Service
from p2pnode.service.job import JobKind, JobState, Progress
from p2pnode.service.statedir import StateDir

KEY = "ed25519:" + "ab" * 32
TOKEN = "test-token-0123456789abcdef"
BASE = "http://127.0.0.1:8123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def open_service(root: Path) -> Service:
    state = StateDir(root)
    state.lock()
    return Service.open(
        state,
        {},
        "config.toml",
        clock=lambda: 1_800_000_000.0,
        local_now=lambda: datetime(2026, 12, 2, 12, 0),
    )


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return open_service(tmp_path / "state")


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(service, TOKEN, {"127.0.0.1:8123", "localhost:8123", "[::1]:8123"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=AUTH) as c:
        yield c


def game(tmp_path: Path, n: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "source": f"game{n}",
        "dest": str(tmp_path / f"g{n}"),
        "trust": [KEY],
        "tracker": "http://127.0.0.1:1",
        **extra,
    }


async def test_add_list_pause_resume_cancel(client: httpx.AsyncClient, tmp_path: Path) -> None:
    r = await client.post(f"{PREFIX}/library", json=game(tmp_path))
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["id"] == "j1" and added["entry"]["id"] == "g1"
    jobs = (await client.get(f"{PREFIX}/jobs")).json()["jobs"]
    assert [(j["id"], j["app"], j["state"]) for j in jobs] == [("j1", "game0", "queued")]
    assert {"bytes_done", "bytes_total", "rate"} <= set(jobs[0])
    r = await client.post(f"{PREFIX}/jobs/g1/pause")  # an entry's id names its job
    assert r.status_code == 200 and r.json()["state"] == "paused"
    r = await client.post(f"{PREFIX}/jobs/j1/pause")
    assert r.status_code == 409 and set(r.json()) == {"error", "fix", "code"}
    assert (await client.post(f"{PREFIX}/jobs/j1/resume")).json()["state"] == "queued"
    assert (await client.post(f"{PREFIX}/jobs/j1/cancel")).json()["state"] == "cancelled"
    r = await client.delete(f"{PREFIX}/library/g1")
    assert r.status_code == 200 and (await client.get(f"{PREFIX}/library")).json() == {
        "entries": []
    }


async def test_bad_input_is_a_4xx_and_changes_nothing(
    client: httpx.AsyncClient, service: Service, tmp_path: Path
) -> None:
    await client.post(f"{PREFIX}/library", json=game(tmp_path))
    v = service.version
    cases = [
        ("post", "/library", {**game(tmp_path, 1), "colour": "red"}, 400),
        ("post", "/library", {**game(tmp_path, 1), "trust": ["ed25519:00"]}, 400),
        ("post", "/library", game(tmp_path, 0), 400),  # the same DEST
        ("post", "/library", {**game(tmp_path, 1), "priority": "urgent"}, 400),
        ("post", "/jobs", {"entry": "g9", "kind": "verify"}, 404),
        ("post", "/jobs", {"entry": "g1", "kind": "verify"}, 409),  # g1 has a job
        ("post", "/jobs/j1/priority", {"priority": "urgent"}, 400),
        ("post", "/jobs/j9/pause", None, 404),
        ("patch", "/settings", {"max_active": 0}, 400),
        ("patch", "/settings", {"max_active": 3, "max_download_rate": "40Q"}, 400),
        ("patch", "/settings", {}, 400),
        ("patch", "/settings", {"colour": 1}, 400),
        ("get", "/nowhere", None, 404),
        ("put", "/jobs", None, 405),
    ]
    for method, path, body, status in cases:
        r = await client.request(method, PREFIX + path, json=body)
        assert r.status_code == status, (path, body, r.text)
        doc = r.json()
        assert doc["error"] and doc["fix"], doc
    assert service.version == v
    assert service.settings.current.max_active == 1  # the patch with a bad rate: all or none
    r = await client.post(
        f"{PREFIX}/library", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    r = await client.post(
        f"{PREFIX}/library", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    r = await client.post(
        f"{PREFIX}/library",
        content=b" " * (MAX_BODY + 1),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert service.version == v


async def test_priority_top_orders_the_list(client: httpx.AsyncClient, tmp_path: Path) -> None:
    for n in range(3):
        await client.post(f"{PREFIX}/library", json=game(tmp_path, n))
    r = await client.post(f"{PREFIX}/jobs/j3/priority", json={"priority": "top"})
    assert r.json()["priority"] == "high"
    await client.post(f"{PREFIX}/jobs/j1/priority", json={"priority": "low"})
    ids = [j["id"] for j in (await client.get(f"{PREFIX}/jobs")).json()["jobs"]]
    assert ids == ["j3", "j2", "j1"]


async def test_settings_patch_and_schedule(client: httpx.AsyncClient, service: Service) -> None:
    window = [{"days": "all", "begin": "11:00", "end": "13:00", "download": "1M"}]
    r = await client.patch(
        f"{PREFIX}/settings",
        json={"max_active": 2, "max_download_rate": "40M", "alt_speed": window},
    )
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["max_active"] == 2 and service.queue.max_active == 2
    assert view["caps_now"]["download"] == 1 << 20  # Wednesday noon is inside the window
    sched = (await client.get(f"{PREFIX}/settings/schedule")).json()
    assert sched["alt_speed"][0]["begin"] == "11:00" and sched["next_change_in"] == 3600
    r = await client.patch(f"{PREFIX}/settings", json={"max_active": None})
    assert r.json()["max_active"] == 1 and "max_active" not in r.json()["overrides"]


async def test_updates_and_verify(
    client: httpx.AsyncClient, service: Service, tmp_path: Path
) -> None:
    await client.post(f"{PREFIX}/library", json=game(tmp_path))
    (start,) = service.next_actions().actions
    service.finished("j1", start.attempt)
    r = await client.post(f"{PREFIX}/updates/check", json={"entry": "g1"})
    (job,) = r.json()["jobs"]
    assert job["kind"] == "update" and job["auto"]
    r = await client.post(f"{PREFIX}/jobs/{job['id']}/defer", json={"until": 2e9})
    assert r.json()["not_before"] == 2e9
    r = await client.post(f"{PREFIX}/updates/apply", json={"entry": "g1"})
    assert r.json()["id"] == job["id"] and not r.json()["auto"] and r.json()["not_before"] == 0
    (start,) = service.next_actions().actions
    service.report(
        job["id"],
        start.attempt,
        phase=JobState.DOWNLOADING,
        progress=Progress(5, 10, 2.0, (("peers", 5),), peers=2),
    )
    got = (await client.get(f"{PREFIX}/jobs/{job['id']}")).json()
    assert got["bytes_done"] == 5 and got["progress"]["by_source"] == {"peers": 5}
    assert got["progress"]["peers"] == 2  # (the peers it exchanges with now)
    service.finished(job["id"], start.attempt)
    got = (await client.get(f"{PREFIX}/jobs/{job['id']}")).json()
    assert got["progress"]["peers"] == 0 and got["rate"] == 0  # a finished job has none
    hist = (await client.get(f"{PREFIX}/updates/history")).json()["jobs"]
    assert [j["id"] for j in hist] == [job["id"]]
    assert (await client.get(f"{PREFIX}/verify/g1")).status_code == 404
    r = await client.post(f"{PREFIX}/verify", json={"entry": "g1"})
    assert r.status_code == 201 and r.json()["kind"] == "verify"
    (start,) = service.next_actions().actions
    service.failed(r.json()["id"], start.attempt, "2 files are corrupt")
    result = (await client.get(f"{PREFIX}/verify/g1")).json()
    assert result["state"] == "failed" and result["error"] == "2 files are corrupt"
    r = await client.patch(f"{PREFIX}/library/g1", json={"auto_update": False})
    assert r.json()["auto_update"] is False


async def test_move_queues_a_move_job_and_refuses_bad_targets(
    client: httpx.AsyncClient, service: Service, tmp_path: Path
) -> None:
    await client.post(f"{PREFIX}/library", json=game(tmp_path))
    (start,) = service.next_actions().actions
    service.finished("j1", start.attempt)
    dest = tmp_path / "g0"
    dest.mkdir()
    InstallDir(dest).create()
    InstallDir(dest).save(InstallState(app="game0", current="00" * 32))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    for body, code, why in [
        ({"to": str(tmp_path / "taken")}, 400, "not empty"),
        ({"to": str(dest / "in")}, 400, "inside the install"),
        ({"to": 5}, 400, "to"),
        ({}, 400, "to"),
    ]:
        r = await client.post(f"{PREFIX}/library/g1/move", json=body)
        assert r.status_code == code and why in r.json()["error"], r.text
    assert (await client.post(f"{PREFIX}/library/g9/move", json={"to": "/x"})).status_code == 404
    assert len(service.queue.jobs) == 1  # nothing queued by a refusal
    r = await client.post(f"{PREFIX}/library/g1/move", json={"to": str(tmp_path / "new")})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "move" and r.json()["target"] == str(tmp_path / "new")


async def test_token_and_host(service: Service, tmp_path: Path) -> None:
    app = make_app(service, TOKEN, {"127.0.0.1:8123"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        assert (await c.get(f"{PREFIX}/openapi.json")).status_code == 200  # public
        assert (await c.get("/")).status_code == 200  # the page holds no secret
        for method, path in (("get", "/jobs"), ("post", "/jobs/j1/pause"), ("get", "/events")):
            r = await c.request(method, PREFIX + path)
            assert r.status_code == 401 and "token" in r.json()["error"], path
        r = await c.post(
            f"{PREFIX}/library",
            json=game(tmp_path),
            headers={"Authorization": "Bearer wrong-token"},
        )
        assert r.status_code == 401 and len(service.library) == 0
        r = await c.get(f"{PREFIX}/jobs", headers={**AUTH, "Host": "evil.example:8123"})
        assert r.status_code == 403 and r.json()["code"] == "bad_host"
        r = await c.get("/?token=wrong")
        assert r.status_code == 401
        r = await c.get(f"/?token={TOKEN}")  # login: a cookie, and the token leaves the URL
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert (await c.get(f"{PREFIX}/jobs")).status_code == 200  # the cookie reads
        r = await c.post(f"{PREFIX}/library", json=game(tmp_path))  # no Origin: refused
        assert r.status_code == 403 and r.json()["code"] == "bad_origin"
        r = await c.post(
            f"{PREFIX}/library", json=game(tmp_path), headers={"Origin": "http://evil.example"}
        )
        assert r.status_code == 403 and len(service.library) == 0
        r = await c.post(
            f"{PREFIX}/library", json=game(tmp_path), headers={"Origin": "http://127.0.0.1:8123"}
        )
        assert r.status_code == 201
        page = await c.get("/")
        assert "access-control-allow-origin" not in page.headers
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_openapi_document_is_valid_and_names_every_route(service: Service) -> None:
    doc = openapi_document()
    validate(doc)  # type: ignore[arg-type]
    app = make_app(service, TOKEN)
    served = {getattr(r, "path", "").removeprefix(PREFIX) for r in app.routes} - {"/"}
    assert served - {"/jobs/{job}/{verb}"} <= set(doc["paths"])
    for name in BODIES:
        assert name in doc["components"]["schemas"]


def test_stream_cuts_history_but_keeps_every_unfinished_job(
    service: Service, tmp_path: Path
) -> None:
    from p2pnode.service.events import STREAM_HISTORY, Changes, streamed

    for n in range(STREAM_HISTORY + 5):
        service.add(f"game{n}", str(tmp_path / f"g{n}"), [KEY], tracker="http://127.0.0.1:1")
        (start,) = service.next_actions().actions
        service.finished(start.job, start.attempt)
    service.submit("g1", JobKind.VERIFY)
    snap = streamed(service.snapshot())
    assert snap["history_cut"] == 5 and len(snap["jobs"]) == STREAM_HISTORY + 1
    assert snap["jobs"][0]["kind"] == "verify"
    changes = Changes(service)
    version, data = changes.encoded()
    assert changes.encoded()[1] is data  # one encoding per version, shared by every client
    service.set_setting("max_active", 2)
    assert changes.encoded()[0] == version + 1


def test_jobs_table_shows_the_peers_of_a_downloading_job() -> None:
    from rich.console import Console

    from p2pnode.service.client import jobs_table

    job = {
        **{"id": "j1", "app": "game", "kind": "install", "state": "downloading"},
        **{"priority": "normal", "bytes_done": 5, "bytes_total": 10, "rate": 0.0},
        "progress": {"by_source": {"peers": 5}, "peers": 3},
    }
    console = Console(width=200, record=True)
    console.print(jobs_table([job, {**job, "id": "j2", "state": "paused"}]))
    head, downloading, paused = console.export_text().splitlines()
    assert head.rstrip().endswith("peers")
    assert downloading.rstrip().endswith(" 3") and not paused.rstrip().endswith("3")
