"""The tracker's Prometheus metrics and load figures, apart from the request handlers.

Names and labels are part of the operator's interface (docs/operations.md): dashboards and
alerts use them, so they do not change. Request counts and latencies are recorded by
:class:`tracker.middleware.RequestMiddleware` for the Starlette port and by
:meth:`TrackerMetrics.record_announce` for the fast announce listener; the swarm gauges come from
the stats gathered just before each scrape (:class:`SwarmCollector`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .core import EVENTS

__all__ = ["LOAD_WINDOW", "SwarmCollector", "TrackerMetrics"]

#: Request latencies kept for the load figures in /v1/stats (a ring; about 1 MB).
LOAD_WINDOW = 20_000


class TrackerMetrics:
    """The counters of one tracker process, and the latency ring behind ``/v1/stats``'s load."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tracker_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tracker_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        announces = Counter(
            "tracker_announces", "Accepted announces, by event", ["event"], registry=self.registry
        )
        self.reports = Counter(
            "tracker_reports", "Accepted peer-quality reports", registry=self.registry
        )
        self.rejected = Counter(
            "tracker_rejected_requests",
            "Requests refused with a 4xx, by error code",
            ["code"],
            registry=self.registry,
        )
        self.moves = Counter(
            "tracker_channel_moves",
            "Channel moves, by action (publish, promote, rollback)",
            ["action"],
            registry=self.registry,
        )
        self.rollout_halts = Counter(
            "tracker_rollout_auto_halts",
            "Rollouts this process halted because their build's failure rate passed the "
            "channel's threshold",
            registry=self.registry,
        )
        self.registry.register(SwarmCollector(self))
        #: accepted announces by event, labelled once (the hot path only increments)
        self.announces = {e: announces.labels(e) for e in EVENTS}
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._announce_latency = self.latency.labels("announce")
        self._load: deque[tuple[float, float]] = deque(maxlen=LOAD_WINDOW)
        self._started = time.monotonic()
        #: the last stats gathered (``/v1/stats`` or a scrape), for the swarm gauges
        self.stats_cache: dict[str, Any] = {"releases": [], "quality": {}}
        #: the install outcomes per build at the same moment (``tracker.outcomes``)
        self.outcomes_cache: list[dict[str, Any]] = []
        #: the channels' rollouts at the same moment (``Rollout.view``)
        self.rollouts_cache: list[dict[str, Any]] = []

    def record(self, route: str, status: int, seconds: float, *, held: bool = False) -> None:
        """Count a request the Starlette port answered. Held requests (SSE, long-polls) last
        as long as the client asks: their time is not latency."""
        self.requests.labels(route, str(status)).inc()
        if not held:
            self.latency.labels(route).observe(seconds)
            self._load.append((time.monotonic(), seconds))

    def record_announce(self, status: int, seconds: float, code: str | None) -> None:
        """Count a request the fast announce listener answered (``code``: its refusal)."""
        key = ("announce", status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels("announce", str(status))
        counter.inc()
        if code is not None:
            self.rejected.labels(code).inc()
        self._announce_latency.observe(seconds)
        self._load.append((time.monotonic(), seconds))

    def load(self) -> dict[str, Any]:
        """Requests per second and latency percentiles over the last ten seconds."""
        now = time.monotonic()
        window = min(10.0, max(1e-3, now - self._started))
        recent = sorted(d for t, d in self._load if t >= now - window)
        n = len(recent)

        def pct(p: float) -> float:
            return recent[min(n - 1, int(p * n))] * 1000 if n else 0.0

        return {
            "window_s": round(window, 3),
            "requests_per_s": round(n / window, 2),
            "p50_ms": round(pct(0.50), 3),
            "p99_ms": round(pct(0.99), 3),
        }

    def exposition(self) -> bytes:
        """Everything, in Prometheus' text format."""
        return generate_latest(self.registry)


class SwarmCollector:
    """Prometheus view of the swarm, from the stats gathered just before each scrape."""

    def __init__(self, metrics: TrackerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        stats = self.metrics.stats_cache
        labels = ["app", "version", "manifest"]
        seeders = GaugeMetricFamily(
            "tracker_swarm_seeders", "Live seeders per release", labels=labels
        )
        leechers = GaugeMetricFamily(
            "tracker_swarm_leechers", "Live leechers per release", labels=labels
        )
        completed = CounterMetricFamily(
            "tracker_release_completed", "Completed downloads per release", labels=labels
        )
        from_peers = CounterMetricFamily(
            "tracker_release_from_peers_bytes",
            "Bytes nodes received from peers (chunks and delta patches), per release",
            labels=labels,
        )
        from_cdn = CounterMetricFamily(
            "tracker_release_from_cdn_bytes",
            "Bytes nodes received from the CDN (chunks and delta patches: its egress), per release",
            labels=labels,
        )
        offload = GaugeMetricFamily(
            "tracker_release_offload_ratio",
            "Share of bytes that came from peers rather than the CDN, per release",
            labels=labels,
        )
        for r in stats.get("releases", []):
            lv = [r["app"], str(r.get("version")), r["manifest_id"]]
            seeders.add_metric(lv, r["seeders"])
            leechers.add_metric(lv, r["leechers"])
            completed.add_metric(lv, r["completed"])
            from_peers.add_metric(lv, r["bytes_from_peers"])
            from_cdn.add_metric(lv, r["bytes_from_cdn"])
            offload.add_metric(lv, r["offload_ratio"])
        yield from (seeders, leechers, completed, from_peers, from_cdn, offload)
        q = stats.get("quality", {})
        dist = GaugeMetricFamily(
            "tracker_peer_quality_peers",
            "Scored peers per quality-score bucket (lower bound of a 0.1-wide bucket)",
            labels=["score_ge"],
        )
        for i, n in enumerate(q.get("histogram", [0] * 10)):
            dist.add_metric([f"{i / 10:.1f}"], n)
        yield dist
        yield GaugeMetricFamily(
            "tracker_peers_flagged",
            "Peers flagged for sending corrupt data to several reporters",
            value=len(q.get("flagged", [])),
        )
        yield from _outcome_metrics(self.metrics.outcomes_cache)
        yield from _rollout_metrics(self.metrics.rollouts_cache)


def _outcome_metrics(builds: list[dict[str, Any]]) -> Any:
    """Install outcomes by build, kind and result, failures by code, and their bytes by
    source (``outcomes.SOURCES``: ``patches_cdn`` and ``patches_peers`` are the delta patch
    bytes within ``cdn`` and ``peers``)."""
    labels = ["app", "version", "manifest"]
    outcomes = CounterMetricFamily(
        "tracker_install_outcomes",
        "Install attempts nodes reported, by build, kind and outcome",
        labels=[*labels, "kind", "outcome"],
    )
    failures = CounterMetricFamily(
        "tracker_install_failures",
        "Failed install attempts nodes reported, by build and failure code",
        labels=[*labels, "code"],
    )
    moved = CounterMetricFamily(
        "tracker_install_outcome_bytes",
        "Bytes install attempts reported, by build and source (peers and cdn count "
        "chunks and delta patches; patches_cdn and patches_peers are the patches among them)",
        labels=[*labels, "source"],
    )
    rollbacks = CounterMetricFamily(
        "tracker_install_rollbacks",
        "Rollback attempts nodes reported, per build: direction=from counts them against the "
        "build the nodes fled, direction=to against the build they landed on",
        labels=[*labels, "direction"],
    )
    rate = GaugeMetricFamily(
        "tracker_install_success_ratio",
        "Share of reported install attempts that succeeded, per build",
        labels=labels,
    )
    for b in builds:
        lv = [b["app"], str(b.get("version")), b["manifest_id"]]
        if b["success_rate"] is not None:
            rate.add_metric(lv, b["success_rate"])
        for kind, n in b["by_kind"].items():
            outcomes.add_metric([*lv, kind, "success"], n["success"])
            outcomes.add_metric([*lv, kind, "failure"], n["failure"])
        for code, n in b["failure_codes"].items():
            failures.add_metric([*lv, code], n)
        for source, n in b["bytes"].items():
            moved.add_metric([*lv, source], n)
        rollbacks.add_metric([*lv, "from"], b["rollbacks_from"])
        rollbacks.add_metric([*lv, "to"], b["rollbacks_to"])
    yield from (outcomes, failures, moved, rollbacks, rate)


def _rollout_metrics(rollouts: list[dict[str, Any]]) -> Any:
    """Each channel's staged rollout: its percentage, whether it is halted, its failures."""
    labels = ["app", "channel", "build"]
    percent = GaugeMetricFamily(
        "tracker_rollout_percent",
        "Percentage of the channel's nodes offered the build",
        labels=labels,
    )
    halted = GaugeMetricFamily(
        "tracker_rollout_halted",
        "1 while the rollout is halted (by the tracker or an operator)",
        labels=labels,
    )
    failed = GaugeMetricFamily(
        "tracker_rollout_failure_ratio",
        "Failed share of the outcomes counted towards the rollout's automatic halt",
        labels=labels,
    )
    for r in rollouts:
        if r["state"] in ("complete", "ended"):
            continue
        lv = [r["app"], r["channel"], str(r["build"])]
        percent.add_metric(lv, r["percent"])
        halted.add_metric(lv, 1.0 if r["state"] == "halted" else 0.0)
        failed.add_metric(lv, r["failure_rate"] or 0.0)
    yield from (percent, halted, failed)
