"""A real nginx for tests: one private instance per test, on a free loopback port.

Each instance gets its own prefix (config, pid file, temp dirs, logs) under a temp directory,
runs ``daemon off`` as a child process, and serves one directory at ``/``. The access log has
one tab-separated line per request with ``$bytes_sent`` (body plus headers, what the process
wrote to the socket), so tests can count requests and sum what nginx pushed, e.g. to check that
a killed install plus its rerun fetched at most 1.1x the release.

``stop()`` and ``start()`` may be called repeatedly (rollback must work with nginx stopped).
The port is kept across restarts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NGINX = os.environ.get("P2PNODE_NGINX", "/usr/sbin/nginx")

_CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 256; }}
http {{
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    log_format p2p '$status\\t$bytes_sent\\t$body_bytes_sent\\t$request_method\\t'
                   '$uri\\t$http_range\\t$request_time';
    access_log {prefix}/access.log p2p;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {root};
        location / {{ }}
    }}
}}
"""


@dataclass(frozen=True)
class AccessLine:
    status: int
    bytes_sent: int  # headers + body written to the socket
    body_bytes_sent: int
    method: str
    uri: str
    range: str  # the request's Range header, "-" if none
    request_time: float


class NginxMissing(RuntimeError):
    pass


class Nginx:
    """One nginx serving ``root`` at ``http://127.0.0.1:<port>/``.

    Args:
        root: directory to serve.
        prefix: a private directory for config, pid, temp files and logs.
    """

    def __init__(self, root: Path, prefix: Path) -> None:
        if not (os.path.isfile(NGINX) and os.access(NGINX, os.X_OK)):
            raise NginxMissing(
                f"nginx is not installed at {NGINX}; run `bash scripts/setup.sh` "
                "(it installs Debian's nginx-light), or set P2PNODE_NGINX"
            )
        self.root = Path(root).resolve()
        self.prefix = Path(prefix).resolve()
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_log = self.prefix / "access.log"
        self.config = self.prefix / "nginx.conf"
        # As root, workers would drop to "nobody", who cannot read pytest's 0700 temp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        self.config.write_text(
            _CONFIG.format(prefix=self.prefix, port=self.port, root=self.root, user=user)
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            return
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.config), "-e", "stderr"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"nginx exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen on port {self.port}") from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: fast shutdown
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> list[AccessLine]:
        """Every request so far. nginx writes a line when the response is finished (or the
        client went away), so a request whose body is still streaming is not in it yet."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            f = line.split("\t")
            if len(f) != 7:
                continue
            out.append(AccessLine(int(f[0]), int(f[1]), int(f[2]), f[3], f[4], f[5], float(f[6])))
        return out

    def bytes_sent(self) -> int:
        """Sum of ``$bytes_sent`` over the access log."""
        return sum(line.bytes_sent for line in self.log())

    def body_bytes_sent(self) -> int:
        return sum(line.body_bytes_sent for line in self.log())

    def clear_log(self) -> None:
        """Start a fresh count (nginx keeps its file handle, so truncate in place)."""
        if self.access_log.exists():
            with open(self.access_log, "r+b") as f:
                f.truncate(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_available() -> bool:
    return os.path.isfile(NGINX) and shutil.which(NGINX) is not None
