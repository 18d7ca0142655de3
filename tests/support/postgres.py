"""A throwaway PostgreSQL cluster for tests: one per session, a fresh database per test.

``initdb`` into a temporary directory, then ``postgres`` on a free loopback port with its unix
socket in that directory too, without fsync (nothing here must survive a crash). Debian puts
the binaries in ``/usr/lib/postgresql/<major>/bin``, off PATH; ``scripts/setup.sh`` installs
them. PostgreSQL refuses to run as root, which CI is: then the cluster runs as ``nobody``
(``setpriv``, which execs, so the process we started is the postmaster and stopping it is one
signal), in a directory it owns.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.support.tracker import free_port

__all__ = ["PostgresCluster", "PostgresMissing", "find_postgres_bin"]

#: The uid and gid the cluster runs as when the tests run as root.
NOBODY = 65534


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (the newest Debian major, or PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit()
        else 0,
    )  # fmt: skip
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).parent
    raise PostgresMissing(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); "
        "fix: bash scripts/setup.sh (apt-get install postgresql)"
    )


class PostgresCluster:
    """A private cluster: :meth:`start`, :meth:`new_database` (a DSN) per test, :meth:`stop`."""

    def __init__(self) -> None:
        self.bin = find_postgres_bin()
        as_root = os.geteuid() == 0
        # as root, under /tmp: nobody must reach the directory (TMPDIR may be root's own)
        where = "/tmp" if as_root and os.path.isdir("/tmp") else None
        self.dir = Path(tempfile.mkdtemp(prefix="p2pnode-pg-", dir=where))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._as = (
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
            if as_root
            else []
        )
        if as_root:
            os.chown(self.dir, NOBODY, NOBODY)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        data = self.dir / "data"
        subprocess.run(
            [*self._as, str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "-A",
             "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        log = open(self.dir / "server.log", "wb")  # noqa: SIM115 (the server writes to it)
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
             "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"postgres did not start within 30 s:\n{tail}")
            time.sleep(0.05)

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # a generated name, never input
        return self.dsn(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then the directory goes."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
