#!/usr/bin/env python3
"""Swarm benchmark on a bandwidth-limited test network (issue 4 item 9); run as root.

What it does, in order:

1. Builds the network with ``scripts/netlab.py``: one origin and N leechers in their own network
   namespaces on a private bridge, every uplink and downlink capped with ``tc tbf``. Default
   case: N=8, leechers 40 Mbit/s up and 100 Mbit/s down, origin 100 Mbit/s up (downlink
   uncapped), a 200 MiB release.
2. Checks the shaping is real: bulk TCP flows between the namespaces, each host's uplink and
   each capped downlink measured against what its caps allow (all leecher uplinks at once into
   the origin; the origin's uplink alone; each downlink by all other hosts sending into it).
3. Computes the fluid-model bound of design.md section 11,
   ``max(F/u_origin, F/d_min, N*F/(u_origin + sum u_i))``.
4. CDN-only: nginx in the origin namespace serves the published release and every leecher runs
   ``p2pnode install ... --mirror http://<origin>:8080/`` at the same time. The origin's upload
   is read from its interface counters (link-layer bytes: headers included).
5. The swarm run (``run_swarm``, ``--runs`` times; the median run by slowest leecher is
   reported, every run listed): the origin installs the release from disk and runs
   ``p2pnode seed`` (origin-frugal, and asking leechers to spare it, unless ``--origin-busy`` /
   ``--origin-not-frugal``); every leecher at once runs ``p2pnode install --policy p2p-only
   --seed`` with the origin and all other leechers as ``--peer``s, serving on its own address,
   and stays until the slowest is done (``--leave-when-done``: each stops when it finishes).
   A leecher's time runs from its start to its ``installed`` event; ``ratio_to_bound`` is the
   slowest leecher's time over the bound, ``origin_upload_x`` the origin's interface upload
   over the release size. Uplinks are sampled every 0.5 s for a timeline (% of each cap).
   With ``--daemons`` a second series runs every leecher as a ``p2pnode daemon`` (its own state
   dir, serving on its own address), already running when the release is added to each one's
   library through the local API (all at once), timed from the add; the origin's seed keeps the
   release listed on a tracker in its namespace, where the daemons find their peers.

Prints a table, then one JSON line with at least ``ratio_to_bound``, ``origin_upload_x``,
``cdn_only_s``, ``bound_s``, the per-run figures and the shaping check's measured rates.
Targets (issue 4): swarm <= 1.10x the bound, origin upload <= 1.5x the release; libtorrent 2.1
measured here: 1.27x and 2.31x, CDN-only 134 s. Last, the cost of encryption (issue 4 item
9's TLS on vs off on loopback), with ``scripts/bench_tls.py``'s measurement (JSON
``encryption``; ``--skip-tls`` leaves it out).

Usage: sudo python3 scripts/bench_swarm.py [--quick] [--leechers 8] [--size-mb 200]
       [--leecher-up 40] [--leecher-down 100] [--origin-up 100] [--origin-down 0] [--runs 1]
       [--leave-when-done] [--origin-busy] [--origin-not-frugal] [--daemons] [--skip-cdn]
       [--check-window 2] [--skip-tls] [--workdir DIR]

Rates in Mbit/s; 0 means uncapped (not allowed for --origin-up: the bound needs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import netlab  # noqa: E402 (scripts/ is not a package)

from p2pnode.demo.cdn import LocalCDN  # noqa: E402
from p2pnode.release import keys  # noqa: E402
from p2pnode.release.publish import publish  # noqa: E402

MiB = 1 << 20
SWARM_PORT = 6881
CDN_PORT = 8080
#: A shaping measurement passes when measured/expected lies in this range. TCP goodput over a
#: tbf-capped link is ~0.95 of the cap (tbf counts frame headers); below 0.85 something else
#: limits the flow (CPU, a wrong qdisc); above 1.02 the cap is not applied.
SHAPING_OK = (0.85, 1.02)


@dataclass(frozen=True)
class Case:
    leechers: int
    size: int  # release bytes (F)
    leecher_up: float | None  # bit/s; None = uncapped
    leecher_down: float | None
    origin_up: float
    origin_down: float | None

    def specs(self) -> list[netlab.HostSpec]:
        out = [netlab.HostSpec("origin", self.origin_up, self.origin_down)]
        out += [
            netlab.HostSpec(f"l{i}", self.leecher_up, self.leecher_down)
            for i in range(1, self.leechers + 1)
        ]
        return out

    def bound_s(self) -> float:
        F = self.size * 8
        d_min = self.leecher_down if self.leecher_down is not None else math.inf
        sum_u = math.inf if self.leecher_up is None else self.leecher_up * self.leechers
        return netlab.fluid_bound(F, self.origin_up, d_min, self.leechers, sum_u)


@dataclass(frozen=True)
class Release:
    cdn_dir: Path  # what nginx serves
    manifest_path: str  # relative to the CDN root
    pub: str  # ed25519:<hex> to --trust
    size: int
    files: int
    chunks: int


# ---------------------------------------------------------------------------------------------
# The release


def make_release(src: Path, total: int, seed: int = 11) -> None:
    """A few large packs and a tail of smaller files, incompressible, from one seeded stream."""
    sizes = [int(total * p) for p in (0.35, 0.25, 0.15)]
    rest = total - sum(sizes)
    i = 0
    while rest > 0:
        s = min(rest, (1 + i % 4) * MiB)
        sizes.append(s)
        rest -= s
        i += 1
    stream = blake3.blake3(b"bench-swarm-%d" % seed)
    offset = 0
    for n, size in enumerate(sizes):
        d = src / ("packs" if n < 3 else f"assets/{n % 5}")
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"file{n:03d}.bin", "wb") as f:
            left = size
            while left:
                k = min(left, 8 * MiB)
                f.write(stream.digest(length=k, seek=offset))
                offset += k
                left -= k


def publish_release(work: Path, size: int) -> Release:
    src, cdn_dir = work / "src", work / "cdn"
    make_release(src, size)
    key = keys.generate_key()
    res = publish(src, app="swarmbench", version="1", build=1, key=key, out=cdn_dir)
    shutil.rmtree(src)
    m = res.manifest
    return Release(
        cdn_dir=cdn_dir,
        manifest_path=res.manifest_path,
        pub=keys.format_public_key(keys.public_key_bytes(key)),
        size=m.total_size,
        files=len(m.files),
        chunks=len(m.unique_chunks()),
    )


# ---------------------------------------------------------------------------------------------
# Shaping check


@dataclass(frozen=True)
class ShapingRow:
    host: str
    direction: str  # "up" | "down"
    cap_bps: float | None
    expected_bps: float  # what the path allows: the cap, or less if another cap binds first
    measured_bps: float

    @property
    def ratio(self) -> float:
        return self.measured_bps / self.expected_bps

    @property
    def ok(self) -> bool:
        return SHAPING_OK[0] <= self.ratio <= SHAPING_OK[1]

    def as_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "dir": self.direction,
            "cap_mbps": None if self.cap_bps is None else self.cap_bps / 1e6,
            "expected_mbps": round(self.expected_bps / 1e6, 2),
            "measured_mbps": round(self.measured_bps / 1e6, 2),
            "ok": self.ok,
        }


def _cap(x: float | None) -> float:
    return math.inf if x is None else x


def shaping_check(lab: netlab.Lab, window: float) -> list[ShapingRow]:
    """Measure every capped direction of every host with bulk TCP; see the module docstring."""
    origin, leechers = lab.hosts[0], lab.hosts[1:]
    rows: list[ShapingRow] = []
    kw: dict[str, float] = {"warmup": 0.4, "window": window, "timeout": window + 15}

    # leecher uplinks: all at once into the origin, unless its downlink would be the bottleneck
    ups = [h for h in leechers if h.up_bps is not None]
    if ups and _cap(origin.down_bps) >= sum(_cap(h.up_bps) for h in ups):
        groups = [ups]
    else:
        groups = [[h] for h in ups]
    for group in groups:
        rates = netlab.measure_flows([netlab.Flow(h, origin) for h in group], **kw)
        for f, bps in rates.items():
            expected = min(_cap(f.src.up_bps), _cap(origin.down_bps))
            rows.append(ShapingRow(f.src.name, "up", f.src.up_bps, expected, bps))

    # the origin's uplink: into the leecher with the widest downlink
    peer = max(leechers, key=lambda h: _cap(h.down_bps))
    bps = next(iter(netlab.measure_flows([netlab.Flow(origin, peer)], **kw).values()))
    expected = min(origin.up_bps or math.inf, _cap(peer.down_bps))
    rows.append(ShapingRow(origin.name, "up", origin.up_bps, expected, bps))

    # each capped downlink: everyone else sends into it at once
    for h in lab.hosts:
        if h.down_bps is None:
            continue
        senders = [s for s in lab.hosts if s is not h]
        rates = netlab.measure_flows([netlab.Flow(s, h) for s in senders], **kw)
        expected = min(h.down_bps, sum(_cap(s.up_bps) for s in senders))
        rows.append(ShapingRow(h.name, "down", h.down_bps, expected, sum(rates.values())))
    for r in rows:
        if math.isinf(r.expected_bps):
            raise SystemExit(f"shaping check: nothing caps {r.host} {r.direction}")
    return rows


# ---------------------------------------------------------------------------------------------
# CDN-only run


@dataclass
class RunResult:
    """One distribution run: per-leecher seconds and what crossed the origin's interface."""

    leecher_s: dict[str, float]
    origin_tx_bytes: int
    leecher_rx_bytes: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def slowest_s(self) -> float:
        return max(self.leecher_s.values())


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_cdn(lab: netlab.Lab, release: Release, prefix: Path) -> netlab.HostProcess:
    """nginx (LocalCDN) inside the origin namespace, via this script's serve-cdn mode."""
    origin = lab.hosts[0]
    proc = origin.start(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "serve-cdn",
            "--root",
            str(release.cdn_dir),
            "--host",
            origin.ip,
            "--port",
            str(CDN_PORT),
            "--prefix",
            str(prefix),
        ],
        name="cdn",
        env=_python_env(),
    )
    deadline = time.monotonic() + 20
    while "READY" not in proc.stdout():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nginx did not start in the origin namespace: {proc.stderr()}")
        time.sleep(0.05)
    return proc


def _wait_all(procs: dict[str, netlab.HostProcess], timeout: float) -> dict[str, float]:
    """Wall seconds of each process, all started together; every one bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        running = [name for name, p in procs.items() if p.poll() is None]
        if not running:
            break
        if time.monotonic() > deadline:
            for p in procs.values():
                p.stop()
            raise SystemExit(f"{', '.join(running)} did not finish within {timeout:.0f}s")
        time.sleep(0.02)
    for name, p in procs.items():
        if p.proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {p.proc.returncode}): {p.stderr()[-600:]}")
    return {name: p.elapsed for name, p in procs.items()}


def _install_result(stdout: str) -> dict[str, Any]:
    """The install's JSON result: its ``installed`` event (with --seed), else its last line."""
    lines = stdout.strip().splitlines()
    events = [line for line in lines if '"event": "installed"' in line]
    return json.loads(events[-1] if events else lines[-1])


class UplinkSampler:
    """Samples every host's upload (its bridge port's rx counter) from the bridge namespace,
    one ``ip -s link`` call per sample, so the report can say when uplinks sat idle."""

    def __init__(self, lab: netlab.Lab, period: float = 0.5) -> None:
        self.ports = {h.bridge_port: h.name for h in lab.hosts}
        self.bridge_ns = lab.bridge_ns
        self.period = period
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def _sample(self) -> None:
        out = subprocess.run(
            ["ip", "-n", self.bridge_ns, "-j", "-s", "link", "show"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        try:
            links = json.loads(out)
        except ValueError:
            return
        tx = {
            self.ports[link["ifname"]]: int(link["stats64"]["rx"]["bytes"])
            for link in links
            if link.get("ifname") in self.ports
        }
        self.samples.append((time.monotonic() - self.t0, tx))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> UplinkSampler:
        self.t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():  # (never started when the run failed before the publish)
            self._thread.join()

    def timeline(self, caps: dict[str, float], bucket: float = 2.0) -> list[dict[str, Any]]:
        """Per ``bucket`` seconds: leechers' summed upload and the origin's, as fractions of
        their caps (bits/s)."""
        rows: list[dict[str, Any]] = []
        if len(self.samples) < 2:
            return rows
        edge = bucket
        start_t, start = self.samples[0]
        for t, tx in self.samples[1:]:
            if t < edge and (t, tx) != self.samples[-1]:
                continue
            span = t - start_t
            if span <= 0:
                continue
            leech = sum(tx[n] - start[n] for n in tx if n != "origin")
            leech_cap = sum(c for n, c in caps.items() if n != "origin")
            rows.append(
                {
                    "t": round(t, 1),
                    "leechers_up": round(8 * leech / span / leech_cap, 3),
                    "origin_up": round(
                        8 * (tx["origin"] - start["origin"]) / span / caps["origin"], 3
                    ),
                }
            )
            start_t, start, edge = t, tx, edge + bucket
        return rows


def _wait_installed(
    procs: dict[str, netlab.HostProcess],
    timeout: float,
    since_wall: float | None = None,
    *,
    stop: bool = True,
) -> dict[str, float]:
    """For ``install --seed`` (or ``daemon``) processes: the seconds until each printed its
    ``installed`` event, from its start (or from the wall-clock time ``since_wall``); then all
    are stopped (they would seed forever) unless not ``stop``; a failure stops them all."""
    deadline = time.monotonic() + timeout
    seconds: dict[str, float] = {}
    try:
        while len(seconds) < len(procs):
            for name, p in procs.items():
                if name in seconds:
                    continue
                if '"event": "installed"' in p.stdout():
                    seconds[name] = p.elapsed if since_wall is None else time.time() - since_wall
                elif p.poll() is not None:
                    raise SystemExit(
                        f"{name} failed (exit {p.proc.returncode}): {p.stderr()[-600:]}"
                    )
            if time.monotonic() > deadline:
                late = sorted(set(procs) - set(seconds))
                raise SystemExit(f"{', '.join(late)} did not finish within {timeout:.0f}s")
            time.sleep(0.02)
    except BaseException:
        stop = True
        raise
    finally:
        if stop:
            for p in procs.values():
                p.stop()
    return seconds


def run_cdn_only(lab: netlab.Lab, release: Release, work: Path, timeout: float) -> RunResult:
    origin, leechers = lab.hosts[0], lab.hosts[1:]
    base = f"http://{origin.ip}:{CDN_PORT}/"
    nginx_prefix = work / "nginx"
    cdn = start_cdn(lab, release, nginx_prefix)
    sampler = UplinkSampler(lab)
    try:
        before = {h.name: h.counters() for h in lab.hosts}
        sampler.__enter__()
        procs: dict[str, netlab.HostProcess] = {}
        for h in leechers:
            dest = work / "leechers" / h.name / "install"
            dest.parent.mkdir(parents=True, exist_ok=True)
            procs[h.name] = h.start(
                [
                    sys.executable,
                    "-m",
                    "p2pnode",
                    "install",
                    base + release.manifest_path,
                    "--dest",
                    str(dest),
                    "--trust",
                    release.pub,
                    "--mirror",
                    base,
                    "--json",
                    "-q",
                ],
                name="install",
                cwd=str(REPO),
                env=_python_env(),
            )
        seconds = _wait_all(procs, timeout)
        after = {h.name: h.counters() for h in lab.hosts}
        results = {
            name: json.loads(p.stdout().strip().splitlines()[-1]) for name, p in procs.items()
        }
    finally:
        cdn.stop()
    bytes_cdn = {name: int(r["bytes_cdn"]) for name, r in results.items()}
    for name, got in bytes_cdn.items():
        if got < release.size:
            raise SystemExit(f"{name} fetched {got} bytes from the CDN, less than the release")
    nginx_body = LocalCDN(release.cdn_dir, prefix=nginx_prefix).body_bytes_sent()
    return RunResult(
        leecher_s=seconds,
        origin_tx_bytes=(after["origin"] - before["origin"]).tx_bytes,
        leecher_rx_bytes={h.name: (after[h.name] - before[h.name]).rx_bytes for h in leechers},
        details={"bytes_cdn": bytes_cdn, "nginx_body_bytes": nginx_body},
    )


# ---------------------------------------------------------------------------------------------
# ============================== SWARM RUN (issue 4 item 9) ==================================


APP = "swarmbench"
TRACKER_PORT = 7070
ADMIN_TOKEN = "bench-swarm-admin-token-0123456789"


def tracker_url(origin: netlab.Host) -> str:
    return f"http://{origin.ip}:{TRACKER_PORT}"


def _wait_for(procs: dict[str, netlab.HostProcess], text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for name, p in procs.items():
        while text not in p.stdout():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not print {text}: {p.stderr()[-600:]}")
            time.sleep(0.05)


def _start_tracker(origin: netlab.Host, work: Path, release: Release) -> netlab.HostProcess:
    """A tracker in the origin's namespace with the bench's app registered."""
    proc = origin.start(
        [
            sys.executable,
            "-m",
            "tracker",
            "serve",
            "--listen",
            f"{origin.ip}:{TRACKER_PORT}",
            "--announce-listen",
            f"{origin.ip}:{TRACKER_PORT + 1}",
            "--data",
            str(work / "tracker"),
            "--admin-token",
            ADMIN_TOKEN,
        ],
        name="tracker",
        cwd=str(REPO),
        env=_python_env(),
    )
    deadline = time.monotonic() + 30
    while "tracker listening on" not in proc.stdout():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the tracker did not start: {proc.stderr()[-600:]}")
        time.sleep(0.05)
    add = ["app", "add", APP, "--key", release.pub, "--url", tracker_url(origin)]
    origin.run([sys.executable, "-m", "tracker", *add, "--admin-token", ADMIN_TOKEN], timeout=40)
    return proc


def _publish(origin: netlab.Host, release: Release, at: float) -> float:
    """Publish the release's signed manifest to the followed channel at wall-clock time ``at``
    (the publishing process starts and imports before it); the time the request was sent."""
    script = (
        "import httpx, sys, time\n"
        "data = open(sys.argv[2], 'rb').read()\n"
        "c = httpx.Client()\n"
        "auth = {'Authorization': 'Bearer ' + sys.argv[3]}\n"
        "time.sleep(max(0.0, float(sys.argv[4]) - time.time()))\n"
        "t = time.time()\n"
        "r = c.post(sys.argv[1], content=data, headers=auth)\n"
        "r.raise_for_status()\n"
        "print(t)\n"
    )
    url = f"{tracker_url(origin)}/v1/apps/{APP}/channels/stable/manifests"
    manifest = str(release.cdn_dir / release.manifest_path)
    argv = [sys.executable, "-c", script, url, manifest, ADMIN_TOKEN, repr(at)]
    res = origin.run(argv, timeout=30)
    return float(res.stdout.strip().splitlines()[-1])


def run_swarm(
    lab: netlab.Lab,
    release: Release,
    work: Path,
    timeout: float,
    *,
    stay: bool = True,
    spare: bool = True,
    daemons: bool = False,
    frugal: bool = True,
) -> RunResult:
    """Distribute ``release`` over the swarm: the origin seeds, every leecher installs at once.

    With ``stay`` (the default, as the fluid model assumes every host uploads until the last
    one finishes), each leecher runs with ``--seed`` and keeps serving after its install; its
    time is when it printed its ``installed`` event, and all stop once the slowest is done.
    Without it, a leecher stops serving (exits) the moment it finishes.

    The origin installs the release from the published files on disk (no network), then runs
    ``p2pnode seed`` in its namespace; nothing else uploads from it. Every leecher runs
    ``p2pnode install --policy p2p-only`` with the origin and every other leecher as peers and
    serves on its own address while it downloads. Each host is its own node (its own identity
    under its own data dir).

    With ``daemons``, every leecher is a ``p2pnode daemon`` (``run_daemons``), as a player's
    client is: already running, it is told to install the release through its local API, and
    finds its peers (the origin, then other daemons) through a tracker in the origin's
    namespace, where the release is published and the origin's seed keeps it listed. A
    leecher's time runs from the add to its ``installed`` event; process start-up is outside
    the measurement, as it is outside a user's click on "install".
    """
    origin, leechers = lab.hosts[0], lab.hosts[1:]
    manifest = str(release.cdn_dir / release.manifest_path)
    origin_dest = work / "swarm" / "origin" / "install"
    origin_dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pnode",
            "install",
            manifest,
            "--dest",
            str(origin_dest),
            "--trust",
            release.pub,
            "--json",
            "-q",
        ],
        check=True,
        capture_output=True,
        cwd=str(REPO),
        env=_python_env(),
    )

    def env_of(name: str) -> dict[str, str]:
        env = _python_env()
        env["XDG_DATA_HOME"] = str(work / "swarm" / name / "data")
        return env

    tracker = _start_tracker(origin, work, release) if daemons else None
    if daemons:  # the channel's head, before any daemon is told to install it
        _publish(origin, release, time.time())
    seed = origin.start(
        [
            sys.executable,
            "-m",
            "p2pnode",
            "seed",
            "--dest",
            str(origin_dest),
            "--listen",
            f"{origin.ip}:{SWARM_PORT}",
            "--json",
            *([] if spare else ["--no-spare"]),
            *([] if frugal else ["--no-frugal"]),
            *(["--tracker", tracker_url(origin)] if daemons else []),
        ],
        name="seed",
        cwd=str(REPO),
        env=env_of("origin"),
    )
    deadline = time.monotonic() + 20
    while "listening" not in seed.stdout():
        if seed.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the origin's seed did not start: {seed.stderr()[-600:]}")
        time.sleep(0.05)
    sampler = UplinkSampler(lab)
    try:
        before = {h.name: h.counters() for h in lab.hosts}
        if daemons:
            seconds, results = run_daemons(lab, release, work, sampler, timeout, env_of)
        else:
            sampler.__enter__()
            seconds, results = _run_installs(lab, release, work, timeout, stay, env_of)
        after = {h.name: h.counters() for h in lab.hosts}
    finally:
        sampler.__exit__()
        seed.stop()
        if tracker is not None:
            tracker.stop()
    details: dict[str, Any] = {
        "bytes_peers": {n: int(r["bytes_peers"]) for n, r in results.items()},
        "bytes_cdn": {n: int(r["bytes_cdn"]) for n, r in results.items()},
        "timeline": sampler.timeline({h.name: h.up_bps or 1e12 for h in lab.hosts}),
    }
    if not daemons:  # an install's own figures (a daemon's job shows bytes by source only)
        details["install_s"] = {n: float(r["seconds"]) for n, r in results.items()}
        # from a leecher's start on the origin to the origin's first piece: the start-up
        details["origin_first_piece_ms"] = {
            n: (r["peers"].get(f"{origin.ip}:{SWARM_PORT}") or {}).get("first_piece_ms")
            for n, r in results.items()
        }
    return RunResult(
        leecher_s=seconds,
        origin_tx_bytes=(after["origin"] - before["origin"]).tx_bytes,
        leecher_rx_bytes={h.name: (after[h.name] - before[h.name]).rx_bytes for h in leechers},
        details=details,
    )


def _run_installs(
    lab: netlab.Lab,
    release: Release,
    work: Path,
    timeout: float,
    stay: bool,
    env_of: Callable[[str], dict[str, str]],
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Every leecher runs ``p2pnode install --policy p2p-only`` at once, with every other host
    as a peer; their seconds and install results."""
    leechers = lab.hosts[1:]
    manifest = str(release.cdn_dir / release.manifest_path)
    procs: dict[str, netlab.HostProcess] = {}
    for h in leechers:
        dest = work / "swarm" / h.name / "install"
        dest.parent.mkdir(parents=True, exist_ok=True)
        peers = [f"{x.ip}:{SWARM_PORT}" for x in lab.hosts if x is not h]
        cmd = [
            *(sys.executable, "-m", "p2pnode", "install", manifest, "--dest", str(dest)),
            *("--trust", release.pub, "--listen", f"{h.ip}:{SWARM_PORT}"),
            *("--policy", "p2p-only", "--json", "-q"),
        ]
        for p in peers:
            cmd += ["--peer", p]
        if stay:
            cmd.append("--seed")
        procs[h.name] = h.start(cmd, name="install", cwd=str(REPO), env=env_of(h.name))
    seconds = _wait_installed(procs, timeout) if stay else _wait_all(procs, timeout)
    return seconds, {name: _install_result(p.stdout()) for name, p in procs.items()}


#: Run in a leecher's namespace before the measurement: finds its daemon's API from the state
#: dir (argv[1]) as the client verbs do, then at wall-clock time argv[3] adds the game
#: (argv[2], the POST /library body) and prints when it sent the request.
ADD_SCRIPT = """
import argparse, json, sys, time
from p2pnode.service.client import ApiClient
api = ApiClient.from_args(argparse.Namespace(state=sys.argv[1], api=None))
api.call("GET", "/settings")  # connected and authorised before the clock starts
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
t = time.time()
print(json.dumps({"sent": t, **api.call("POST", "/library", json.loads(sys.argv[2]))}))
"""


def _verb_env(env: dict[str, str], config: Path) -> dict[str, str]:
    config.parent.mkdir(parents=True, exist_ok=True)
    config.touch()  # empty: no user config reaches the bench's daemons
    return {**env, "P2PNODE_CONFIG": str(config)}


def run_daemons(
    lab: netlab.Lab,
    release: Release,
    work: Path,
    sampler: UplinkSampler,
    timeout: float,
    env_of: Callable[[str], dict[str, str]],
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Every leecher as a ``p2pnode daemon`` serving on its own address; once all run, the
    release is added to each one's library through its local API at the same instant (the
    timeline's zero); each one's seconds from then to its ``installed`` event, and its job's
    bytes by source as ``p2pnode jobs --json`` shows them."""
    leechers = lab.hosts[1:]
    url = tracker_url(lab.hosts[0])
    procs: dict[str, netlab.HostProcess] = {}
    env: dict[str, dict[str, str]] = {}
    state: dict[str, str] = {}
    try:
        for h in leechers:
            home = work / "swarm" / h.name
            env[h.name] = _verb_env(env_of(h.name), home / "config.toml")
            state[h.name] = str(home / "state")
            cmd = [sys.executable, "-m", "p2pnode", "daemon", "--state", state[h.name]]
            cmd += ["--listen", f"{h.ip}:{SWARM_PORT}", "--json"]
            procs[h.name] = h.start(cmd, name="daemon", cwd=str(REPO), env=env[h.name])
        _wait_for(procs, '"event": "started"', 60)
        at = time.time() + 3.0  # the adders start and connect before it
        adders: dict[str, netlab.HostProcess] = {}
        for h in leechers:
            dest = work / "swarm" / h.name / "install"
            body = {"source": APP, "dest": str(dest), "trust": [release.pub], "tracker": url}
            cmd = [sys.executable, "-c", ADD_SCRIPT, state[h.name], json.dumps(body), repr(at)]
            adders[h.name] = h.start(cmd, name="add", cwd=str(REPO), env=env[h.name])
        threading.Timer(max(0.0, at - time.time()), sampler.__enter__).start()
        _wait_all(adders, 60)
        sent = {n: json.loads(p.stdout().strip().splitlines()[-1]) for n, p in adders.items()}
        seconds = _wait_installed(procs, timeout, since_wall=at, stop=False)
        results: dict[str, dict[str, Any]] = {}
        for h in leechers:
            verb = [sys.executable, "-m", "p2pnode", "jobs", "--state", state[h.name], "--json"]
            p = h.start(verb, name="jobs", cwd=str(REPO), env=env[h.name])
            p.wait(60)
            jobs = {j["id"]: j for j in json.loads(p.stdout())["jobs"]}
            by_source = jobs[sent[h.name]["id"]]["progress"]["by_source"]
            results[h.name] = {
                "bytes_peers": by_source.get("peers", 0),
                "bytes_cdn": by_source.get("cdn", 0),
            }
    finally:
        for p in procs.values():
            p.stop()
    return seconds, results


# ============================ END SWARM RUN =================================================
# ---------------------------------------------------------------------------------------------


def serve_cdn(root: Path, host: str, port: int, prefix: Path) -> None:
    """Run LocalCDN here (inside the origin namespace) until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cdn = LocalCDN(root, host=host, port=port, prefix=prefix)
    cdn.start()
    try:
        print(f"READY {cdn.url}", flush=True)
        stop.wait()
    finally:
        cdn.stop()


def _timeline_text(run: RunResult) -> str:
    return "  ".join(
        f"{r['t']:.0f}s {100 * r['leechers_up']:.0f}/{100 * r['origin_up']:.0f}%"
        for r in run.details.get("timeline", [])
    )


def _runs_text(runs: list[RunResult], bound: float, size: int) -> str:
    return ", ".join(f"{r.slowest_s / bound:.2f}x/{r.origin_tx_bytes / size:.2f}x" for r in runs)


def _median(runs: list[RunResult]) -> RunResult:
    return sorted(runs, key=lambda r: r.slowest_s)[(len(runs) - 1) // 2]


def _mbps(bps: float | None) -> str:
    return "uncapped" if bps is None else f"{bps / 1e6:g}"


def _rate_arg(text: str) -> float | None:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError("rates cannot be negative")
    return None if v == 0 else v * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    sc = sub.add_parser("serve-cdn", help=argparse.SUPPRESS)
    sc.add_argument("--root", type=Path, required=True)
    sc.add_argument("--host", required=True)
    sc.add_argument("--port", type=int, required=True)
    sc.add_argument("--prefix", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="N=3 and a 32 MiB release")
    ap.add_argument("--leechers", type=int, help="default 8 (3 with --quick)")
    ap.add_argument("--size-mb", type=int, help="release MiB, default 200 (32 with --quick)")
    ap.add_argument("--leecher-up", type=_rate_arg, default=40e6, help="Mbit/s (default 40)")
    ap.add_argument("--leecher-down", type=_rate_arg, default=100e6, help="Mbit/s (default 100)")
    ap.add_argument("--origin-up", type=_rate_arg, default=100e6, help="Mbit/s (default 100)")
    ap.add_argument("--origin-down", type=_rate_arg, default=None, help="Mbit/s (default none)")
    ap.add_argument("--check-window", type=float, default=2.0, help="seconds per shaping flow")
    ap.add_argument("--skip-cdn", action="store_true", help="no CDN-only run")
    ap.add_argument(
        "--runs", type=int, default=1, help="swarm runs; the median is reported (default 1)"
    )
    ap.add_argument(
        "--leave-when-done",
        action="store_true",
        help="leechers stop serving when their install ends (default: they seed until the "
        "slowest is done, as the fluid model assumes)",
    )
    ap.add_argument(
        "--origin-busy",
        action="store_true",
        help="the origin seeds with --no-spare: leechers do not spare its upload (faster, more "
        "origin upload; the default spares it)",
    )
    ap.add_argument(
        "--origin-not-frugal",
        action="store_true",
        help="the origin seeds with --no-frugal: it uploads a chunk again even while others "
        "were never uploaded (with --origin-busy: a plain seed)",
    )
    ap.add_argument(
        "--daemons",
        action="store_true",
        help="also run the swarm with every leecher a running p2pnode daemon, told to install "
        "the release through its local API, timed from there",
    )
    ap.add_argument(
        "--skip-tls",
        action="store_true",
        help="no loopback measurement of what encryption costs (scripts/bench_tls.py, ~10 s)",
    )
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    if args.cmd == "serve-cdn":
        serve_cdn(args.root, args.host, args.port, args.prefix)
        return
    if args.origin_up is None:
        ap.error("--origin-up must be capped: the fluid bound divides by it")
    reason = netlab.netlab_available()
    if reason:
        raise SystemExit(f"bench_swarm: {reason} (run it as root on Linux with iproute2)")
    case = Case(
        leechers=args.leechers or (3 if args.quick else 8),
        size=(args.size_mb or (32 if args.quick else 200)) * MiB,
        leecher_up=args.leecher_up,
        leecher_down=args.leecher_down,
        origin_up=args.origin_up,
        origin_down=args.origin_down,
    )
    if not 1 <= case.leechers <= 200:
        ap.error("--leechers must be 1..200")
    if not 1 <= args.runs <= 20:
        ap.error("--runs must be 1..20")
    work = Path(tempfile.mkdtemp(prefix="bench-swarm-", dir=args.workdir))
    try:
        t = time.perf_counter()
        release = publish_release(work, case.size)
        publish_s = time.perf_counter() - t
        for p in release.cdn_dir.rglob("*"):  # warm the page cache: nginx reads from memory
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(8 * MiB):
                        pass
        bound = case.bound_s()
        with netlab.Lab(case.specs(), workdir=work / "lab") as lab:
            print(lab.describe(), flush=True)
            t = time.perf_counter()
            rows = shaping_check(lab, args.check_window)
            check_s = time.perf_counter() - t
            for r in rows:
                flag = "ok" if r.ok else "OUT OF RANGE"
                print(
                    f"  shaping {r.host:<7} {r.direction:<4} cap {_mbps(r.cap_bps):>8} "
                    f"expected {r.expected_bps / 1e6:6.1f} measured {r.measured_bps / 1e6:6.1f} "
                    f"Mbit/s ({r.ratio:.3f}) {flag}",
                    flush=True,
                )
            # CDN-only: every leecher from nginx on the origin. Bounded by 3x the time the
            # origin's uplink needs for N copies, plus a minute for start-up and fsync.
            cdn_need = case.leechers * case.size * 8 / case.origin_up
            cdn = None
            if not args.skip_cdn:
                cdn = run_cdn_only(lab, release, work, timeout=3 * cdn_need + 60)

            def series(daemons: bool) -> list[RunResult]:
                """``--runs`` swarm runs, each in a directory of its own (~N+1 copies of the
                release, removed after)."""
                out = []
                for k in range(args.runs):
                    run_dir = work / f"{'daemons' if daemons else 'run'}{k}"
                    run_dir.mkdir()
                    out.append(
                        run_swarm(
                            lab,
                            release,
                            run_dir,
                            timeout=10 * bound + 60,
                            stay=daemons or not args.leave_when_done,
                            spare=not args.origin_busy,
                            frugal=not args.origin_not_frugal,
                            daemons=daemons,
                        )
                    )
                    shutil.rmtree(run_dir, ignore_errors=True)
                return out

            # The median run by slowest leecher stands for all; every run is listed.
            runs = series(daemons=False)
            swarm = _median(runs)
            daemon_runs = series(daemons=True) if args.daemons else []
            daemon = _median(daemon_runs) if daemon_runs else None
        F = release.size
        cdn_x = cdn.origin_tx_bytes / F if cdn else None
        rows_out: list[tuple[str, str]] = [
            (
                "case",
                f"N={case.leechers}, leechers {_mbps(case.leecher_up)} up / "
                f"{_mbps(case.leecher_down)} down, origin {_mbps(case.origin_up)} up / "
                f"{_mbps(case.origin_down)} down (Mbit/s)",
            ),
            (
                "release",
                f"{F / MiB:.0f} MiB in {release.files} files, {release.chunks} chunks "
                f"(published in {publish_s:.1f} s)",
            ),
            (
                "shaping check",
                f"{sum(r.ok for r in rows)}/{len(rows)} directions within "
                f"{SHAPING_OK[0]:.2f}-{SHAPING_OK[1]:.2f} of the cap ({check_s:.0f} s)",
            ),
            ("fluid-model bound", f"{bound:.1f} s"),
        ]
        if cdn:
            rows_out += [
                (
                    "CDN-only slowest",
                    f"{cdn.slowest_s:.1f} s ({cdn.slowest_s / bound:.2f}x the bound; "
                    f"N*F/u_origin = {cdn_need:.1f} s)",
                ),
                (
                    "CDN-only origin upload",
                    f"{cdn_x:.2f}x the release (interface counters; nginx bodies "
                    f"{cdn.details['nginx_body_bytes'] / F:.2f}x)",
                ),
            ]
        rows_out += [
            ("swarm slowest", f"{swarm.slowest_s:.1f} s = {swarm.slowest_s / bound:.2f}x"),
            (
                "swarm leechers",
                f"first done {min(swarm.leecher_s.values()):.1f} s; leechers "
                + (
                    "seed until the slowest is done"
                    if not args.leave_when_done
                    else "leave when done"
                ),
            ),
            ("swarm origin upload", f"{swarm.origin_tx_bytes / F:.2f}x the release"),
            (
                "swarm uplinks",
                _timeline_text(swarm) + " (leechers'/origin's upload as % of caps, per 2 s)",
            ),
            (
                "swarm runs",
                _runs_text(runs, bound, F)
                + " (ratio/origin upload; the median run is shown above)",
            ),
        ]
        if daemon:
            rows_out += [
                (
                    "daemons slowest",
                    f"{daemon.slowest_s:.1f} s = {daemon.slowest_s / bound:.2f}x from the adds "
                    f"through the API (first done {min(daemon.leecher_s.values()):.1f} s; "
                    f"from peers {sum(daemon.details['bytes_peers'].values()) / MiB:.0f} MiB "
                    f"of {len(daemon.leecher_s) * F / MiB:.0f}); origin "
                    f"upload {daemon.origin_tx_bytes / F:.2f}x",
                ),
                ("daemons uplinks", _timeline_text(daemon)),
                ("daemons runs", _runs_text(daemon_runs, bound, F)),
            ]
        rows_out.append(("targets", "swarm <= 1.10x the bound, origin upload <= 1.5x"))
        tls = None
        if not args.skip_tls:
            from bench_tls import measure  # (this script's directory is on sys.path)

            tls = measure()
            rows_out.append(
                (
                    "encryption",
                    f"loopback, one connection of piece frames: TLS 1.3 {tls['tls_mb_s']:.0f} MB/s "
                    f"vs plain TCP {tls['plain_mb_s']:.0f} MB/s (costs {tls['cost']:.0%})",
                )
            )
        width = max(len(k) for k, _ in rows_out)
        for k, v in rows_out:
            print(f"{k:<{width}}  {v}")
        out: dict[str, Any] = {
            "ratio_to_bound": round(swarm.slowest_s / bound, 3),
            "swarm_s": round(swarm.slowest_s, 2),
            "origin_upload_x": round(swarm.origin_tx_bytes / F, 3),
            "origin_upload_source": "swarm",
            "cdn_only_s": round(cdn.slowest_s, 2) if cdn else None,
            "cdn_only_ratio_to_bound": round(cdn.slowest_s / bound, 3) if cdn else None,
            "cdn_origin_upload_x": round(cdn_x, 3) if cdn_x is not None else None,
            "cdn_leecher_s": {k: round(v, 2) for k, v in cdn.leecher_s.items()} if cdn else None,
            "swarm_leecher_s": {k: round(v, 2) for k, v in swarm.leecher_s.items()},
            "leechers_stay": not args.leave_when_done,
            "origin_spared": not args.origin_busy,
            "origin_frugal": not args.origin_not_frugal,
            "swarm_timeline": swarm.details.get("timeline"),
            "swarm_runs": [
                {
                    "ratio_to_bound": round(r.slowest_s / bound, 3),
                    "origin_upload_x": round(r.origin_tx_bytes / F, 3),
                }
                for r in runs
            ],
            "daemons": None
            if daemon is None
            else {
                "ratio_to_bound": round(daemon.slowest_s / bound, 3),
                "swarm_s": round(daemon.slowest_s, 2),
                "origin_upload_x": round(daemon.origin_tx_bytes / F, 3),
                "leecher_s": {k: round(v, 2) for k, v in daemon.leecher_s.items()},
                "timeline": daemon.details.get("timeline"),
                "runs": [
                    {
                        "ratio_to_bound": round(r.slowest_s / bound, 3),
                        "origin_upload_x": round(r.origin_tx_bytes / F, 3),
                    }
                    for r in daemon_runs
                ],
            },
            "bound_s": round(bound, 2),
            "bytes": F,
            "leechers": case.leechers,
            "shaping_ok": all(r.ok for r in rows),
            "shaping": [r.as_json() for r in rows],
            "encryption": tls,
        }
        print(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
