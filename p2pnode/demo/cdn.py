"""A real nginx serving a directory on loopback: the CDN of the demo, tests and benchmarks.

nginx is what operators put in front of releases, so the demo and the CDN tests use it rather
than a Python server that would hide real-world behaviour (ranges, keep-alive, sendfile). It runs
in the foreground (``daemon off``) under a private prefix, with an access log that records the
bytes sent per request, which is how tests count what a client really fetched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import P2PNodeError

__all__ = ["AccessLine", "LocalCDN", "find_nginx", "free_port"]

_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    types {{ application/octet-stream p2pm; }}
    default_type application/octet-stream;
    log_format p2p '$status\\t$bytes_sent\\t$body_bytes_sent\\t$request_method\\t'
                   '$uri\\t$http_range\\t$request_time';
    access_log {prefix}/access.log p2p;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen {host}:{port};
        root {root};
        location / {{ autoindex off; }}
    }}
}}
"""


@dataclass(frozen=True)
class AccessLine:
    """One request as nginx logged it (when the response ended or the client went away)."""

    status: int
    bytes_sent: int  # headers + body written to the socket
    body_bytes_sent: int
    method: str
    uri: str
    range: str  # the request's Range header, "-" if none
    request_time: float


def find_nginx() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise P2PNodeError(
        "nginx is not installed", fix="run `bash scripts/setup.sh` (installs nginx-light)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalCDN:
    """nginx serving ``root`` at ``http://host:port/``; start/stop as often as needed."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.port = port or free_port(host)
        self._own_prefix = prefix is None
        self.prefix = Path(prefix or tempfile.mkdtemp(prefix="p2pnode-nginx-")).resolve()
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(
            _CONF.format(
                prefix=self.prefix,
                host=host,
                port=self.port,
                root=self.root,
                # as root, nginx would drop to 'nobody', who cannot read a private tree
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [
                find_nginx(),
                "-p",
                str(self.prefix),
                "-c",
                str(self.conf),
                "-e",
                str(self.prefix / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self.prefix / "error.log").read_text(errors="replace")[-500:]
                self._proc = None
                raise P2PNodeError(f"nginx failed to start: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise P2PNodeError(f"nginx did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> list[AccessLine]:
        """Every finished request so far (a body still streaming is not logged yet)."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            f = line.split("\t")
            if len(f) == 7:
                out.append(
                    AccessLine(int(f[0]), int(f[1]), int(f[2]), f[3], f[4], f[5], float(f[6]))
                )
        return out

    def bytes_sent(self, path_prefix: str = "/") -> int:
        """Header and body bytes nginx wrote for requests under ``path_prefix``."""
        return sum(x.bytes_sent for x in self.log() if x.uri.startswith(path_prefix))

    def body_bytes_sent(self, path_prefix: str = "/") -> int:
        return sum(x.body_bytes_sent for x in self.log() if x.uri.startswith(path_prefix))

    def clear_log(self) -> None:
        """Start a fresh count (nginx keeps its file handle, so truncate in place)."""
        if self.access_log.exists():
            with open(self.access_log, "r+b") as f:
                f.truncate(0)

    def close(self) -> None:
        self.stop()
        if self._own_prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> LocalCDN:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
