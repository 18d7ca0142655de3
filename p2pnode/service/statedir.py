"""The daemon's state dir: where one node per machine keeps everything that outlives it.

Layout (all files mode 0600, the directory 0700, since the token and the key are secrets and
the library names what a user installs)::

    STATE/
        lock            flock'd by the one daemon that owns this state dir
        api-token       the local API's bearer token, made once, mode 0600
        api.json        where the running daemon's API listens (written by the API server)
        library.json    the library (p2pnode.service.library)
        queue.json      the job queue (p2pnode.service.queue)
        settings.json   settings changed through the API (caps, max_active, schedule)
        node-key.pem    the node identity (p2pnode.identity), so two state dirs are two nodes
        moves/          one journal per game being moved (p2pnode.service.move)

Two daemons on one state dir would each think they own the queue and race on every file, so
the second is refused at once with :class:`ServiceLockedError`. The lock is ``flock`` on an
open file: the kernel drops it when the process dies, so a ``kill -9`` never leaves a stale lock
for the next daemon to trip over (a PID file would).

Every JSON file is written with :func:`p2pnode.disk.fsutil.write_atomic` (a reader, or a
daemon restarted after a crash, sees the old or the new document, never half of one) and read
with a size bound; a file that is not what we wrote raises :class:`DamagedStateError` naming
the file, instead of being silently reset (that would lose the user's library).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..disk.fsutil import LockedDir, write_atomic
from ..errors import DamagedStateError, ServiceLockedError

__all__ = [
    "MAX_STATE_FILE_BYTES",
    "DamagedStateError",
    "ServiceLockedError",
    "StateDir",
    "default_state_dir",
    "read_json",
    "write_json",
]

# A library of thousands of games and a long queue stay far below this; anything larger is not
# a file we wrote, and reading it whole would let a stray file exhaust memory.
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024

TOKEN_BYTES = 32


def default_state_dir() -> Path:
    """The user's data dir, the same one the node identity lives in by default."""
    import platformdirs

    return Path(platformdirs.user_data_dir("p2pnode")) / "service"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if there is no file.

    Raises:
        DamagedStateError: too large, not UTF-8 JSON, or not an object.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_STATE_FILE_BYTES:
        raise DamagedStateError(f"{path} is larger than {MAX_STATE_FILE_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DamagedStateError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DamagedStateError(f"{path} does not hold a JSON object")
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Replace ``path`` with ``doc`` atomically (mode 0600), sorted so diffs stay readable."""
    data = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"
    write_atomic(path, data, mode=0o600)


class StateDir(LockedDir):
    """The paths of one state dir, its lock, and its API token.

    Args:
        root: the directory; made (mode 0700) on :meth:`lock` if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock_file = root / "lock"
        self.token_file = root / "api-token"
        self.library = root / "library.json"
        self.queue = root / "queue.json"
        self.settings = root / "settings.json"
        self.api_file = root / "api.json"
        self.moves = root / "moves"

    def lock(self) -> None:
        """Own this state dir until :meth:`unlock` (or the process ends).

        Raises:
            ServiceLockedError: another process (or another :class:`StateDir` in this one)
                holds it.
        """
        if self.locked:
            raise RuntimeError(f"{self.root} is already locked by this object")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._take_lock(self.lock_file):
            raise ServiceLockedError(f"another p2pnode daemon is using the state dir {self.root}")

    def write_api_address(self, url: str) -> None:
        """Tell clients where this daemon's API listens (``p2pnode jobs`` reads it without
        taking the lock); the API server writes it once bound and removes it on the way out."""
        write_json(self.api_file, {"format": 1, "url": url, "pid": os.getpid()})

    def clear_api_address(self, url: str) -> None:
        """Remove ``api.json`` if it still names ``url`` (never a newer daemon's)."""
        try:
            if self.api_address() == url:
                self.api_file.unlink()
        except (OSError, DamagedStateError):
            pass

    def api_address(self) -> str | None:
        """The URL in ``api.json`` (None: no file). A daemon killed with -9 leaves a stale one:
        clients find out when the connection is refused."""
        doc = read_json(self.api_file)
        if doc is None:
            return None
        url = doc.get("url")
        if doc.get("format") != 1 or not isinstance(url, str) or not url.startswith("http"):
            raise DamagedStateError(f"{self.api_file} is not an API address this daemon wrote")
        return url

    def api_token(self) -> str:
        """The API token, made on first use; the same string on every later call and run.

        Made with ``O_EXCL`` so two callers never write two tokens; a token readable by other
        users is refused rather than trusted (anyone who can read it can drive the daemon).
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        try:
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read_token()
        try:
            os.write(fd, token.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return token

    def read_api_token(self) -> str | None:
        """The token if one was made (a client's read: never makes one)."""
        return self._read_token() if self.token_file.exists() else None

    def _read_token(self) -> str:
        st = os.stat(self.token_file)
        if st.st_mode & 0o077:
            raise DamagedStateError(
                f"API token {self.token_file} is readable by other users",
                fix=f"chmod 600 {self.token_file}",
            )
        token = self.token_file.read_text(encoding="ascii", errors="replace").strip()
        if len(token) < 16 or not token.isascii() or not token.isprintable():
            raise DamagedStateError(
                f"API token {self.token_file} is empty or damaged",
                fix=f"delete {self.token_file}; the daemon makes a new one",
            )
        return token
