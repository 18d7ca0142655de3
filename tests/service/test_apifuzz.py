"""Schema-driven fuzzing of the client daemon's local API (issue 18): schemathesis reads
``/api/v1/openapi.json`` from the API served by hypercorn on loopback and runs every check
(status codes, content types, response schemas, no 5xx, valid requests accepted and invalid
ones refused, the token enforced) over every operation, with the state dir's token. Bounded and
seeded as tests/tracker/test_apifuzz.py; ``bash scripts/apifuzz`` is the long run."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import trio

from p2pnode.service.api import serve_api
from p2pnode.service.control import Service
from p2pnode.service.statedir import StateDir
from tests.support.apifuzz import fuzz

HERE = Path(__file__).parent


async def test_the_fuzzer_finds_nothing_wrong_with_the_local_api(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.lock()
    service = Service.open(state, {}, "config.toml", local_now=lambda: datetime(2026, 12, 2, 12))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_api, service, "127.0.0.1", 0, state.api_token())
        url = f"http://127.0.0.1:{port}/api/v1/openapi.json"
        code, report = await fuzz(url, state.api_token(), HERE / "apifuzz.toml", tmp_path)
        nursery.cancel_scope.cancel()
    print(report)  # shown with -s, and on failure
    assert code == 0, report
