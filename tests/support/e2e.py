"""The tracker and CLI as processes, for end-to-end tests: the `p2pnode` CLI and an app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.release import make_release

ADMIN = "e2e-admin-token-0123456789abcdef"


def cli(*args: str, ok: bool = True) -> dict[str, Any]:
    """Run ``p2pnode ARGS --json`` in a subprocess: its JSON answer, plus ``_stderr``. With
    ``ok`` it must exit 0; without, a failure's (possibly empty) answer is returned."""
    proc = subprocess.run(
        [sys.executable, "-m", "p2pnode", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
        out: dict[str, Any] = json.loads(proc.stdout)
    else:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    out["_stderr"] = proc.stderr
    return out


def registered_app(tmp_path: Path, tracker_url: str) -> tuple[Path, Path, Path, str]:
    """A release to publish, a CDN folder, a publisher key, and app "game" on the tracker."""
    src, cdn_root = tmp_path / "src", tmp_path / "cdn"
    cdn_root.mkdir()
    make_release(src, big=4 << 20)
    key = tmp_path / "k.pem"
    pub = str(cli("keygen", str(key))["key"])
    add = ["app", "add", "game", "--key", pub, "--url", tracker_url, "--admin-token", ADMIN]
    subprocess.run([sys.executable, "-m", "tracker", *add], check=True, capture_output=True)
    return src, cdn_root, key, pub
