#!/usr/bin/env python3
"""A bandwidth-limited test network made of Linux network namespaces (root only).

Theory of operation
-------------------
A lab is one *bridge namespace* holding a Linux bridge, plus one *host namespace* per host (an
origin and N leechers). Each host is joined to the bridge by a veth pair created directly inside
the two namespaces (``ip link add eth0 netns HOST type veth peer name pI netns BRIDGE``), so no
interface of a lab ever exists in the root namespace, even for a moment, and deleting a lab's
namespaces destroys every link it made. Hosts get addresses in a small private subnet
(10.77.0.0/24 by default: .1 is the first host) and only the on-link route for it: no default
route, no NAT, no forwarding, IPv6 off. A packet for anything outside the lab fails locally with
ENETUNREACH; nothing can leave. Parallel labs may reuse the same subnet because their bridges are
in different namespaces.

Shaping is ``tc tbf`` on egress only, which is where Linux can queue:

* a host's **uplink** is the egress of its own ``eth0`` (host namespace);
* its **downlink** is the egress of its bridge port ``pI`` (bridge namespace).

tbf counts link-layer bytes, so a single TCP flow's goodput tops out near 95-96 % of the cap
(1448 payload bytes per 1514-byte frame, timestamps on); the counters that :meth:`Host.counters`
reads are link-layer bytes too.

Names and leftovers. Every lab has a random 6-hex-digit run id; its namespaces are
``<prefix>-<run>-br`` and ``<prefix>-<run>-<host>``. While a lab lives, its process holds an
``flock`` on ``/run/p2pnode-netlab/<prefix>-<run>.lock``; the kernel drops that lock when the
process dies however it dies (even kill -9), so ``cleanup-stale`` can tell a killed run's
leftovers (lock free, or no lock file) from a live parallel run (lock held) and removes only the
former: it kills the processes still inside those namespaces (``ip netns pids``: only what a lab
started runs there) and deletes the namespaces.

Teardown (:meth:`Lab.teardown`, also run by the context manager, on errors, on SIGINT/SIGTERM/
SIGHUP while the context is active, and at interpreter exit as a backstop) stops every process
started through the lab, kills whatever else still runs in its namespaces, deletes them, checks
that none is left, and releases the lock.

Measuring. ``tcp-sink`` and ``tcp-source`` (subcommands of this file, run inside host
namespaces) are a tiny bulk-TCP receiver and sender: the sink waits until every expected flow
has connected, lets ``warmup`` seconds pass (tbf's burst, slow start), then counts the bytes
each peer sends during ``window`` seconds and prints one JSON line. :func:`measure_flows` runs a
set of concurrent flows that way and returns each flow's goodput in bits per second.

CLI::

    netlab.py up [--leechers N] [--up 40] [--down 100] [--origin-up 100] [--origin-down 0]
    netlab.py cleanup-stale [--prefix p2plab] [--force]
    netlab.py list
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pnode.errors import P2PNodeError, UsageError

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBNET",
    "Flow",
    "Host",
    "HostProcess",
    "HostSpec",
    "IfCounters",
    "Lab",
    "NetlabError",
    "NetlabUnavailable",
    "cleanup_stale",
    "fluid_bound",
    "list_labs",
    "measure_flows",
    "netlab_available",
]

DEFAULT_PREFIX = "p2plab"
DEFAULT_SUBNET = "10.77.0.0/24"
LOCK_DIR = Path("/run/p2pnode-netlab")
HOST_IF = "eth0"
BRIDGE_IF = "br0"
#: Port the tcp-sink listens on inside a host namespace (namespaces have private port spaces).
SINK_PORT = 5201
#: tbf bucket: at least this many bytes (a few full frames; smaller buckets starve TSO bursts) ...
MIN_BURST = 16 * 1024
#: ... or this many seconds' worth of the rate, whichever is larger.
BURST_SECONDS = 0.004
#: tbf queue, as the longest a packet may wait; enough to keep a TCP flow busy on a veth (the
#: RTT is tens of microseconds), short enough not to add real delay.
DEFAULT_LATENCY_MS = 20
_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")


class NetlabError(P2PNodeError):
    """A lab could not be built, used or torn down."""

    default_fix = "run `python3 scripts/netlab.py cleanup-stale`, then retry"


class NetlabUnavailable(NetlabError):
    """This machine or user cannot build network namespaces."""

    default_fix = "run as root on Linux with iproute2 (`ip`, `tc`) installed"


# ---------------------------------------------------------------------------------------------
# The fluid model (design.md section 11)


def fluid_bound(F: float, u_origin: float, d_min: float, N: int, sum_u: float) -> float:
    """Least possible time for N leechers to each get F bytes (or bits) from one origin.

    The three terms are the three bottlenecks no scheduler can beat: the origin must upload every
    byte at least once (F/u_origin), the slowest leecher must download all of it (F/d_min), and
    the N*F bytes delivered must all be uploaded by someone (N*F over the total upload capacity).
    Units only need to agree (bytes with bytes/s, or bits with bit/s).

    Raises:
        UsageError: a non-positive size, rate or leecher count.
    """
    if F <= 0 or u_origin <= 0 or d_min <= 0 or N <= 0 or sum_u < 0:
        raise UsageError(
            f"fluid bound needs F, u_origin, d_min, N > 0 and sum_u >= 0 "
            f"(got F={F}, u_origin={u_origin}, d_min={d_min}, N={N}, sum_u={sum_u})",
            fix="pass the release size and the hosts' capped rates",
        )
    return max(F / u_origin, F / d_min, N * F / (u_origin + sum_u))


# ---------------------------------------------------------------------------------------------
# Small helpers


def _run(argv: Sequence[str], *, timeout: float = 15.0, check: bool = True) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"`{' '.join(argv)}` did not finish within {timeout}s") from exc
    except FileNotFoundError as exc:
        raise NetlabUnavailable(f"{argv[0]} is not installed") from exc
    if check and proc.returncode != 0:
        raise NetlabError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def netlab_available() -> str | None:
    """None if labs can be built here, else the reason they cannot (for skips and messages)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"])
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours still answers signal 0; reap it if it is ours
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _mbit(bps: float | None) -> str:
    return "uncapped" if bps is None else f"{bps / 1e6:g} Mbit/s"


# ---------------------------------------------------------------------------------------------
# The lab


@dataclass(frozen=True)
class HostSpec:
    """A host to build: its name and its caps in bits per second (None: uncapped)."""

    name: str
    up_bps: float | None
    down_bps: float | None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise UsageError(
                f"host name {self.name!r} is not lowercase letters and digits (<= 16)",
                fix="name hosts like origin, l1, l2",
            )
        for cap in (self.up_bps, self.down_bps):
            if cap is not None and cap < 8_000:
                raise UsageError(f"cap {cap} bit/s for {self.name} is below 8 kbit/s")


@dataclass(frozen=True)
class IfCounters:
    """Link-layer byte and packet counters of one interface (headers included)."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int

    def __sub__(self, other: IfCounters) -> IfCounters:
        return IfCounters(
            self.rx_bytes - other.rx_bytes,
            self.tx_bytes - other.tx_bytes,
            self.rx_packets - other.rx_packets,
            self.tx_packets - other.tx_packets,
        )


class HostProcess:
    """A long-running process inside a host namespace; output goes to files in the lab's dir.

    It runs in its own session, so :meth:`stop` reaches its children (nginx workers, ...) too.
    """

    def __init__(self, host: Host, name: str, argv: Sequence[str], popen_kw: dict[str, Any]):
        self.host = host
        self.name = name
        self.argv = list(argv)
        self.stdout_path = host.lab.workdir / f"{host.name}.{name}.out"
        self.stderr_path = host.lab.workdir / f"{host.name}.{name}.err"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 (closed in wait/stop)
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.started = time.monotonic()
        self.ended: float | None = None
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,
            **popen_kw,
        )
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.monotonic()
            self._close_files()
        return rc

    def wait(self, timeout: float) -> int:
        """Wait at most ``timeout`` seconds; on timeout the process is stopped and this raises."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.stop()
            raise NetlabError(
                f"{self.name} on {self.host.name} did not finish within {timeout:.0f}s; "
                f"stderr: {self.stderr()[-400:]}",
                fix="raise the time limit, or look at the process's output",
            ) from exc
        self.poll()
        return rc

    @property
    def elapsed(self) -> float:
        """Seconds from start to exit (or to now, if still running)."""
        return (self.ended or time.monotonic()) - self.started

    def stop(self, grace: float = 3.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        else:
            # the leader exited; children it left in the session still die with the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self.poll()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _close_files(self) -> None:
        self._out.close()
        self._err.close()


@dataclass(eq=False)  # identity: hosts key dicts and flows
class Host:
    """One host namespace of a lab."""

    lab: Lab
    index: int
    name: str
    netns: str
    ip: str
    up_bps: float | None
    down_bps: float | None
    bridge_port: str
    ifname: str = HOST_IF
    processes: list[HostProcess] = field(default_factory=list)

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside this host (bounded by ``timeout``)."""
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", self.netns, *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise NetlabError(f"{argv[0]} on {self.name} ran past {timeout}s") from exc
        if check and proc.returncode != 0:
            raise NetlabError(
                f"`{' '.join(argv)}` on {self.name} exited {proc.returncode}: "
                f"{proc.stderr.strip()[-400:]}"
            )
        return proc

    def start(
        self, argv: Sequence[str], *, name: str | None = None, **popen_kw: Any
    ) -> HostProcess:
        """Start a long-running process here; the lab stops it at teardown if it still runs."""
        tag = name or Path(argv[0]).name
        if any(p.name == tag for p in self.processes):  # output files are named after it
            tag = f"{tag}-{len(self.processes)}"
        proc = HostProcess(self, tag, argv, popen_kw)
        self.processes.append(proc)
        return proc

    def counters(self) -> IfCounters:
        """This host's ``eth0`` counters: tx is what it uploaded, rx what it downloaded."""
        out = _run(["ip", "-n", self.netns, "-j", "-s", "link", "show", "dev", self.ifname])
        stats = json.loads(out)[0]["stats64"]
        return IfCounters(
            stats["rx"]["bytes"],
            stats["tx"]["bytes"],
            stats["rx"]["packets"],
            stats["tx"]["packets"],
        )

    def qdiscs(self) -> str:
        """tc's view of both ends of this host's link (for reports and debugging)."""
        up = _run(["tc", "-n", self.netns, "qdisc", "show", "dev", self.ifname])
        down = _run(["tc", "-n", self.lab.bridge_ns, "qdisc", "show", "dev", self.bridge_port])
        return f"up:   {up.strip()}\ndown: {down.strip()}"


class Lab:
    """A bridge namespace and one namespace per host, shaped with tbf; see the module comment.

    Use as a context manager (``with Lab(specs) as lab:``) or call :meth:`build` and
    :meth:`teardown` yourself; teardown is idempotent and also runs at interpreter exit.

    Args:
        hosts: what to build; the first host gets the subnet's first address.
        subnet: an IPv4 network with room for every host.
        prefix: namespace name prefix (what ``cleanup-stale`` looks for).
        latency_ms: tbf queue length, as the longest a packet may wait.
        workdir: where process output goes (a fresh temporary directory by default).
    """

    def __init__(
        self,
        hosts: Sequence[HostSpec],
        *,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = DEFAULT_PREFIX,
        latency_ms: float = DEFAULT_LATENCY_MS,
        workdir: Path | None = None,
    ) -> None:
        names = [h.name for h in hosts]
        if not hosts or len(set(names)) != len(names) or "br" in names:
            raise UsageError(f"hosts must be non-empty with unique names other than 'br': {names}")
        if not re.match(r"^[a-z][a-z0-9]{0,11}$", prefix):
            raise UsageError(f"prefix {prefix!r} must be lowercase letters and digits (<= 12)")
        self.net = ipaddress.IPv4Network(subnet)
        if not self.net.is_private or self.net.num_addresses - 2 < len(hosts):
            raise UsageError(f"subnet {subnet} must be private and hold {len(hosts)} hosts")
        self.specs = list(hosts)
        self.prefix = prefix
        self.run_id = secrets.token_hex(3)
        self.tag = f"{prefix}-{self.run_id}"
        self.bridge_ns = f"{self.tag}-br"
        self.latency_ms = latency_ms
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts: list[Host] = []
        self._created: list[str] = []  # namespaces, in creation order
        self._lock_fd: int | None = None
        self._lock_path = LOCK_DIR / f"{self.tag}.lock"
        self._old_handlers: dict[int, Any] = {}
        self._torn_down = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self._install_signal_handlers()
        try:
            self.build()
        except BaseException:
            self.teardown()
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.teardown()
        finally:
            self._restore_signal_handlers()

    def build(self) -> Lab:
        reason = netlab_available()
        if reason:
            raise NetlabUnavailable(f"cannot build a test network: {reason}")
        # Take the lock first: from here on, a kill at any point leaves something that
        # cleanup-stale recognises as stale.
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        atexit.register(self.teardown)

        self._add_netns(self.bridge_ns)
        br = ["ip", "-n", self.bridge_ns]
        _run([*br, "link", "add", BRIDGE_IF, "type", "bridge"])
        # no STP: the bridge must forward at once, and there are no loops to protect against
        _run(
            [
                *br,
                "link",
                "set",
                BRIDGE_IF,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ]
        )
        _run([*br, "link", "set", BRIDGE_IF, "up"])
        addrs = list(self.net.hosts())
        for i, spec in enumerate(self.specs):
            host = Host(
                lab=self,
                index=i,
                name=spec.name,
                netns=f"{self.tag}-{spec.name}",
                ip=str(addrs[i]),
                up_bps=spec.up_bps,
                down_bps=spec.down_bps,
                bridge_port=f"p{i}",
            )
            self._add_netns(host.netns)
            self._sysctl(host.netns, "net/ipv6/conf/all/disable_ipv6", "1")
            self._sysctl(host.netns, "net/ipv6/conf/default/disable_ipv6", "1")
            self._sysctl(host.netns, "net/ipv4/ip_forward", "0")
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    HOST_IF,
                    "netns",
                    host.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    host.bridge_port,
                    "netns",
                    self.bridge_ns,
                ]
            )
            hn = ["ip", "-n", host.netns]
            _run([*hn, "addr", "add", f"{host.ip}/{self.net.prefixlen}", "dev", HOST_IF])
            _run([*hn, "link", "set", "lo", "up"])
            _run([*hn, "link", "set", HOST_IF, "up"])
            _run([*br, "link", "set", host.bridge_port, "master", BRIDGE_IF])
            _run([*br, "link", "set", host.bridge_port, "up"])
            if spec.up_bps is not None:
                self._tbf(host.netns, HOST_IF, spec.up_bps)
            if spec.down_bps is not None:
                self._tbf(self.bridge_ns, host.bridge_port, spec.down_bps)
            self.hosts.append(host)
        self._check_isolated()
        return self

    def teardown(self) -> None:
        """Stop everything this lab started and delete every namespace (and so link) it made."""
        if self._torn_down:
            return
        self._torn_down = True
        errors: list[str] = []
        for host in self.hosts:
            for proc in host.processes:
                try:
                    proc.stop()
                except Exception as exc:  # keep tearing down; report at the end
                    errors.append(f"stopping {proc.name} on {host.name}: {exc}")
        for ns in reversed(self._created):
            try:
                _kill_pids(_netns_pids(ns))
                _run(["ip", "netns", "del", ns], check=False)
            except Exception as exc:
                errors.append(f"deleting {ns}: {exc}")
        try:
            left = [n for n in _netns_names() if n.startswith(self.tag + "-")]
        except Exception as exc:
            left = [f"(cannot list namespaces: {exc})"]
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.teardown)
        if left or errors:
            raise NetlabError(f"teardown of {self.tag} left {left} ({'; '.join(errors)})")

    # -- queries -----------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def namespaces(self) -> list[str]:
        """Every namespace of this lab that exists now."""
        return [n for n in _netns_names() if n.startswith(self.tag + "-")]

    def describe(self) -> str:
        lines = [f"lab {self.tag}: bridge namespace {self.bridge_ns}, subnet {self.net}"]
        for h in self.hosts:
            lines.append(
                f"  {h.name:<8} {h.ip:<12} netns {h.netns:<22} "
                f"up {_mbit(h.up_bps):<14} down {_mbit(h.down_bps)}"
            )
        return "\n".join(lines)

    # -- internals ---------------------------------------------------------------------------

    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)

    @staticmethod
    def _sysctl(ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > /proc/sys/{key}"])

    def _tbf(self, ns: str, dev: str, bps: float) -> None:
        burst = max(MIN_BURST, int(bps / 8 * BURST_SECONDS))
        _run(
            [
                "tc",
                "-n",
                ns,
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{int(bps)}bit",
                "burst",
                str(burst),
                "latency",
                f"{self.latency_ms}ms",
            ]
        )

    def _check_isolated(self) -> None:
        """Refuse to run a lab whose hosts could route anywhere but their own subnet."""
        for h in self.hosts:
            routes = json.loads(_run(["ip", "-n", h.netns, "-j", "-4", "route", "show"]) or "[]")
            bad = [r for r in routes if r.get("dst") != str(self.net)]
            if bad:
                raise NetlabError(f"{h.netns} has routes outside {self.net}: {bad}")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def to_exit(signum: int, frame: FrameType | None) -> None:
            # Unwind through the with-block so teardown runs, like Ctrl-C does.
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, to_exit)
        self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()


# ---------------------------------------------------------------------------------------------
# Leftovers


def list_labs(prefix: str = DEFAULT_PREFIX) -> dict[str, list[str]]:
    """Lab tags (``prefix-run``) with their namespaces, for every lab namespace that exists."""
    labs: dict[str, list[str]] = {}
    pat = re.compile(rf"^({re.escape(prefix)}-[0-9a-f]{{6}})-[a-z0-9]+$")
    for ns in _netns_names():
        m = pat.match(ns)
        if m:
            labs.setdefault(m.group(1), []).append(ns)
    for lock in LOCK_DIR.glob(f"{prefix}-*.lock") if LOCK_DIR.is_dir() else []:
        labs.setdefault(lock.stem, [])
    return labs


def _lab_is_live(tag: str) -> bool:
    path = LOCK_DIR / f"{tag}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, force: bool = False) -> list[str]:
    """Remove what killed labs left behind; returns the namespaces deleted.

    A lab whose owner still runs (its lock is held) is left alone unless ``force``.
    """
    removed: list[str] = []
    for tag, namespaces in sorted(list_labs(prefix).items()):
        if not force and _lab_is_live(tag):
            continue
        # host namespaces first, then the bridge: same order as teardown
        for ns in sorted(namespaces, key=lambda n: n.endswith("-br")):
            _kill_pids(_netns_pids(ns))
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
        with contextlib.suppress(OSError):
            (LOCK_DIR / f"{tag}.lock").unlink()
    return removed


# ---------------------------------------------------------------------------------------------
# Throughput measurement


@dataclass(frozen=True)
class Flow:
    """One bulk TCP transfer from ``src`` to ``dst``."""

    src: Host
    dst: Host


def measure_flows(
    flows: Sequence[Flow], *, warmup: float = 0.5, window: float = 1.5, timeout: float = 20.0
) -> dict[Flow, float]:
    """Run every flow at once; return each one's goodput in bit/s over the sink's window.

    One sink per destination counts each source separately, so fan-in (several sources into one
    host: its downlink is the bottleneck) and fan-out both work. Bounded: every process is
    stopped after ``timeout`` seconds.
    """
    if not flows:
        return {}
    script = str(Path(__file__).resolve())
    by_dst: dict[str, list[Flow]] = {}
    for f in flows:
        by_dst.setdefault(f.dst.name, []).append(f)
    sinks: dict[str, HostProcess] = {}
    sources: list[HostProcess] = []
    try:
        for name, group in by_dst.items():
            dst = group[0].dst
            sinks[name] = dst.start(
                [
                    sys.executable,
                    script,
                    "tcp-sink",
                    "--listen",
                    f"{dst.ip}:{SINK_PORT}",
                    "--expect",
                    str(len(group)),
                    "--warmup",
                    str(warmup),
                    "--window",
                    str(window),
                    "--timeout",
                    str(timeout),
                ],
                name=f"sink{len(dst.processes)}",
            )
        deadline = time.monotonic() + 10
        for name, sink in sinks.items():
            while "READY" not in sink.stdout():
                if sink.poll() is not None or time.monotonic() > deadline:
                    raise NetlabError(f"tcp-sink on {name} did not start: {sink.stderr()[-300:]}")
                time.sleep(0.02)
        for f in flows:
            sources.append(
                f.src.start(
                    [
                        sys.executable,
                        script,
                        "tcp-source",
                        "--connect",
                        f"{f.dst.ip}:{SINK_PORT}",
                        "--seconds",
                        str(timeout),
                    ],
                    name=f"source{len(f.src.processes)}",
                )
            )
        results: dict[Flow, float] = {}
        for name, sink in sinks.items():
            rc = sink.wait(timeout + 5)
            lines = [ln for ln in sink.stdout().splitlines() if ln.startswith("{")]
            if rc != 0 or not lines:
                raise NetlabError(f"tcp-sink on {name} failed: {sink.stderr()[-400:]}")
            report = json.loads(lines[-1])
            for f in by_dst[name]:
                got = report["peers"].get(f.src.ip)
                if got is None:
                    raise NetlabError(f"no flow from {f.src.name} reached {name}: {report}")
                results[f] = got["bytes"] * 8 / report["seconds"]
        return results
    finally:
        for proc in [*sources, *sinks.values()]:
            proc.stop()


def _tcp_sink(listen: str, expect: int, warmup: float, window: float, timeout: float) -> None:
    """Accept ``expect`` connections, then count each peer's bytes over the window."""
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)), backlog=64)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    counts: dict[socket.socket, int] = {}
    peers: dict[socket.socket, str] = {}
    print("READY", flush=True)
    hard = time.monotonic() + timeout
    t_start: float | None = None  # when the window opens
    snap0: dict[socket.socket, int] = {}
    buf = bytearray(1 << 20)
    while True:
        now = time.monotonic()
        if now > hard:
            raise SystemExit(f"tcp-sink: timed out with {len(counts)}/{expect} connections")
        if t_start is None and len(counts) >= expect:
            t_start = now + warmup
        if t_start is not None and not snap0 and now >= t_start:
            snap0 = dict(counts)
            t0 = now
        if snap0 and now >= t0 + window:
            t1 = now
            break
        for key, _ in sel.select(timeout=0.02):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s is srv:
                conn, addr = srv.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                counts[conn] = 0
                peers[conn] = addr[0]
                continue
            try:
                n = s.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError:
                n = 0
            if n == 0:
                sel.unregister(s)
                s.close()
            else:
                counts[s] += n
    report = {
        "seconds": t1 - t0,
        "peers": {peers[s]: {"bytes": counts[s] - snap0.get(s, 0)} for s in counts if s in peers},
    }
    print(json.dumps(report), flush=True)


def _tcp_source(connect: str, seconds: float) -> None:
    """Send as fast as TCP allows until the sink hangs up or ``seconds`` pass."""
    host, port = connect.rsplit(":", 1)
    block = os.urandom(256 * 1024)
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                s.sendall(block)
            except TimeoutError:
                continue
            except OSError:  # the sink closed: the measurement is over
                return


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_mbit(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of Mbit/s: {text!r}") from exc
    if v < 0:
        raise argparse.ArgumentTypeError("rates cannot be negative")
    return None if v == 0 else v * 1e6


@contextlib.contextmanager
def _report_errors() -> Iterator[None]:
    try:
        yield
    except P2PNodeError as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="bandwidth-limited test networks from namespaces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and keep it until Ctrl-C (or SIGTERM)")
    up.add_argument("--leechers", type=int, default=8)
    up.add_argument("--up", type=_parse_mbit, default=40e6, help="leecher Mbit/s (0: none)")
    up.add_argument("--down", type=_parse_mbit, default=100e6, help="leecher Mbit/s")
    up.add_argument("--origin-up", type=_parse_mbit, default=100e6)
    up.add_argument("--origin-down", type=_parse_mbit, default=None)
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    up.add_argument("--prefix", default=DEFAULT_PREFIX)
    cs = sub.add_parser("cleanup-stale", help="remove namespaces left by killed labs")
    cs.add_argument("--prefix", default=DEFAULT_PREFIX)
    cs.add_argument("--force", action="store_true", help="also labs whose owner still runs")
    ls = sub.add_parser("list", help="list labs and whether their owner still runs")
    ls.add_argument("--prefix", default=DEFAULT_PREFIX)
    sk = sub.add_parser("tcp-sink", help=argparse.SUPPRESS)
    sk.add_argument("--listen", required=True)
    sk.add_argument("--expect", type=int, default=1)
    sk.add_argument("--warmup", type=float, default=0.5)
    sk.add_argument("--window", type=float, default=1.5)
    sk.add_argument("--timeout", type=float, default=20.0)
    so = sub.add_parser("tcp-source", help=argparse.SUPPRESS)
    so.add_argument("--connect", required=True)
    so.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args(argv)

    if args.cmd == "tcp-sink":
        _tcp_sink(args.listen, args.expect, args.warmup, args.window, args.timeout)
    elif args.cmd == "tcp-source":
        _tcp_source(args.connect, args.seconds)
    elif args.cmd == "cleanup-stale":
        with _report_errors():
            removed = cleanup_stale(args.prefix, force=args.force)
        print("\n".join(removed) if removed else "nothing stale")
    elif args.cmd == "list":
        with _report_errors():
            for tag, nss in sorted(list_labs(args.prefix).items()):
                state = "live" if _lab_is_live(tag) else "stale"
                print(f"{tag}  {state}  {' '.join(sorted(nss))}")
    elif args.cmd == "up":
        specs = [HostSpec("origin", args.origin_up, args.origin_down)]
        specs += [HostSpec(f"l{i}", args.up, args.down) for i in range(1, args.leechers + 1)]
        with _report_errors(), Lab(specs, subnet=args.subnet, prefix=args.prefix) as lab:
            print(lab.describe())
            print("run commands with: ip netns exec <netns> <command>; Ctrl-C tears down")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


if __name__ == "__main__":
    main()
