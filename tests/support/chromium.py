"""Headless Chromium driven over the DevTools protocol, for tests that click through a page.

``--dump-dom`` (the tracker's dashboard test) shows what a page rendered; a page with actions
needs clicks and waits. ``--remote-debugging-pipe`` speaks the DevTools protocol as
NUL-terminated JSON on fds 3 (commands in) and 4 (answers out): no port, no WebSocket library.
Blocking calls: use it from a thread (``trio.to_thread.run_sync``) while the server under test
runs in the trio loop.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

#: Headless, quiet, and nothing fetched but what the test asks for.
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_binary() -> str:
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(binary):
        pytest.fail("chromium is not installed (fix: bash scripts/setup.sh)")
    return binary


class Chromium:
    """One headless browser with one page (``session``)."""

    def __init__(self, profile: Path) -> None:
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def fds() -> None:  # the child's fd 3 reads our commands, fd 4 writes its answers
            # dup2 onto itself keeps close-on-exec (a script with few open files gets the
            # pipe as fd 3): then only clearing the flag passes it on
            for fd, want in ((to_child, 3), (from_child, 4)):
                if fd == want:
                    os.set_inheritable(fd, True)
                else:
                    os.dup2(fd, want)

        self.proc = subprocess.Popen(
            [
                chromium_binary(),
                *HEADLESS,
                f"--user-data-dir={profile}",
                "--window-size=1400,900",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=fds,  # only dup2 between fork and exec: safe with threads
        )
        os.close(to_child)
        os.close(from_child)
        self._buf = b""
        self._next = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]

    def send(self, method: str, params: dict[str, Any] | None = None, *, page: bool = False) -> Any:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                data = os.read(self._in, 1 << 20)
                if not data:
                    raise RuntimeError("chromium went away")
                self._buf += data
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, page=True)

    def js(self, expression: str) -> Any:
        """The value of ``expression`` in the page (promises awaited)."""
        out = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            page=True,
        )
        if "exceptionDetails" in out:
            raise AssertionError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except AssertionError:
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"the page never showed {expression}")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)
