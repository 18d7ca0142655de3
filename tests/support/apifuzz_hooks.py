"""Schemathesis hooks for fuzzing the tracker's HTTP API (loaded through SCHEMATHESIS_HOOKS by
tests/tracker/test_apifuzz.py and scripts/apifuzz).

Only what keeps a run bounded and lets requests reach the handlers: a manifest or key rotation
body goes out as the raw bytes the fuzzer drew (the server's parser decides), a long-poll waits
20 ms instead of up to a minute, and the event stream is opened on a channel that has a build,
so its first event arrives at once (an empty channel's stream stays open until a publish)."""

from __future__ import annotations

from typing import Any

import schemathesis

#: the seeded app and channel (tests/tracker/test_apifuzz.py publishes a build to it)
APP = "game"
CHANNEL = "stable"
MAX_WAIT = 0.02

for media in ("application/x-p2pnode-manifest", "application/x-p2pnode-rotation"):
    schemathesis.serializer.alias(media, "application/octet-stream")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    path = case.operation.path
    if path == "/v1/apps/{app}/channels/{channel}" and case.query:
        try:
            wait = float(case.query["wait"])
        except (KeyError, TypeError, ValueError):
            return  # absent, or not a number: the server refuses it at once
        if wait > MAX_WAIT:
            case.query["wait"] = MAX_WAIT
    elif path.endswith("/events"):
        case.path_parameters = {**(case.path_parameters or {}), "app": APP, "channel": CHANNEL}
        if case.query:
            case.query.pop("since", None)
