"""A tracker process on loopback, for the demo and end-to-end tests.

Run as its own process (``python -m tracker serve``), as operators run it, not imported: the
node never depends on the tracker's server code, only on its HTTP contract.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import P2PNodeError

__all__ = ["LocalTracker"]


class LocalTracker:
    """``tracker serve`` on a free loopback port; ``url`` once started."""

    def __init__(self, data_dir: Path, admin_token: str, *extra_args: str) -> None:
        self.data_dir = data_dir
        self.admin_token = admin_token
        self.extra_args = extra_args
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tracker",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--announce-listen",  # as a production tracker runs: announces on their own port
                "127.0.0.1:0",
                "--data",
                str(self.data_dir),
                "--admin-token",
                self.admin_token,
                *self.extra_args,
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: it prints its address or exits
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            self._proc = None
            raise P2PNodeError(f"the tracker did not start: {err.strip()[-300:]}")
        self.url = str(json.loads(line)["url"])
        return self.url

    def stop(self) -> int | None:
        """SIGTERM (a graceful shutdown); returns the exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
