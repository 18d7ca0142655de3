"""Alert conditions, evaluated on the tracker for the dashboard's banner. No I/O here.

The same five conditions are Prometheus alerting rules in docs/alerts.yml, over the metrics
``/metrics`` exports; the thresholds below are the ones the rules use (a test reads the file
and checks). The two differ only where the tracker cannot keep Prometheus' history: a build's
failure rate here is over all the outcomes the tracker holds for it (the rule: the last hour),
and p99 latency is over the last ten seconds (``TrackerMetrics.load``; the rule: five minutes).

:class:`AlertWatch` keeps what the conditions over time need (offload and flagged peers an
hour ago): one sample of the totals per ``SAMPLE_S``, ``KEEP`` of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAILURE_MIN_REPORTS",
    "FAILURE_RATE",
    "FLAGGED_RISE",
    "OFFLOAD_DROP",
    "P99_MS",
    "Alert",
    "AlertWatch",
]

#: A build whose failed share of install outcomes passes this, over at least this many.
FAILURE_RATE = 0.05
FAILURE_MIN_REPORTS = 20
#: The share of bytes from peers over the last ``RECENT_S`` fell this much (absolute) below
#: the same window an hour earlier.
OFFLOAD_DROP = 0.2
RECENT_S = 15 * 60
HOUR_S = 3600
#: At least this many more peers flagged than an hour ago.
FLAGGED_RISE = 3
#: Tracker request latency, 99th percentile (milliseconds).
P99_MS = 250.0
SAMPLE_S = 60.0
KEEP = 90  # an hour and a half of samples


@dataclass(frozen=True, slots=True)
class Alert:
    """One firing condition: ``name`` as in docs/alerts.yml, and a sentence for people."""

    name: str
    severity: str
    summary: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "severity": self.severity, "summary": self.summary}


def _offload(
    later: tuple[float, int, int, int], earlier: tuple[float, int, int, int]
) -> float | None:
    peers, cdn = later[1] - earlier[1], later[2] - earlier[2]
    return peers / (peers + cdn) if peers + cdn > 0 else None


class AlertWatch:
    """Evaluates the conditions on each stats refresh (see the module docstring)."""

    def __init__(self) -> None:
        #: (time, bytes from peers, bytes from the CDN, flagged peers), oldest first
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=KEEP)

    def _at(self, t: float) -> tuple[float, int, int, int] | None:
        """The newest sample taken at or before ``t``."""
        best = None
        for s in self._samples:
            if s[0] > t:
                break
            best = s
        return best

    def evaluate(
        self, stats: dict[str, Any], outcomes: list[dict[str, Any]], now: float
    ) -> list[Alert]:
        """The alerts firing now, given ``/v1/stats``' body, the outcome tally per build
        (``OutcomeTally.stats``' shape) and the time."""
        releases = stats.get("releases", [])
        flagged = len(stats.get("quality", {}).get("flagged", []))
        sample = (
            now,
            sum(int(r["bytes_from_peers"]) for r in releases),
            sum(int(r["bytes_from_cdn"]) for r in releases),
            flagged,
        )
        if not self._samples or now - self._samples[-1][0] >= SAMPLE_S:
            self._samples.append(sample)
        out = []
        for b in outcomes:
            n = int(b.get("reports", 0))
            if n >= FAILURE_MIN_REPORTS and int(b["failure"]) / n > FAILURE_RATE:
                out.append(
                    Alert(
                        "BuildFailureRateHigh",
                        "critical",
                        f"{b['failure']} of {n} installs of {b['app']} build {b['build']} "
                        f"failed ({100 * int(b['failure']) / n:.0f}% > {FAILURE_RATE:.0%})",
                    )
                )
        a, b0, c = (
            self._at(now - RECENT_S),
            self._at(now - HOUR_S),
            self._at(now - HOUR_S - RECENT_S),
        )
        recent = _offload(sample, a) if a else None
        before = _offload(b0, c) if b0 and c else None
        if recent is not None and before is not None and recent < before - OFFLOAD_DROP:
            out.append(
                Alert(
                    "CdnOffloadFalling",
                    "warning",
                    f"peers served {recent:.0%} of the bytes in the last 15 minutes, "
                    f"{before:.0%} an hour before",
                )
            )
        for r in stats.get("rollouts", []):
            if r.get("state") == "halted":
                out.append(
                    Alert(
                        "RolloutHalted",
                        "critical",
                        f"the rollout of {r['app']} build {r['build']} on {r['channel']} is "
                        f"halted: {r.get('reason') or 'by an operator'}",
                    )
                )
        hour = self._at(now - HOUR_S)
        if hour is not None and flagged - hour[3] >= FLAGGED_RISE:
            out.append(
                Alert(
                    "FlaggedPeersRising",
                    "warning",
                    f"{flagged - hour[3]} more peers flagged for corrupt data than an hour ago",
                )
            )
        p99 = float(stats.get("load", {}).get("p99_ms", 0.0))
        if p99 > P99_MS:
            out.append(
                Alert(
                    "TrackerLatencyHigh",
                    "warning",
                    f"the tracker's p99 latency is {p99:.0f} ms (> {P99_MS:.0f} ms)",
                )
            )
        return out
