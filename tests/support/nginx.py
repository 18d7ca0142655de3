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

from p2pnode.demo.cdn import AccessLine, LocalCDN
from p2pnode.errors import P2PNodeError

__all__ = ["AccessLine", "Nginx", "NginxMissing"]

Nginx = LocalCDN
NginxMissing = P2PNodeError
