"""What reports say about peers, and how answers rank them: pure, no I/O.

Quality
-------
Reports accumulate per peer: MiB received from it, failed requests, corrupt chunks, an EWMA of
its rate, and the set of distinct reporters that saw corrupt data. :func:`quality_score` maps that
to a number in [0, 1] (0.5 for a peer nobody has reported on yet); a peer that
``FLAG_REPORTERS`` distinct reporters saw send corrupt data is *flagged*: its score is 0 and it is
left out of every announce answer until an operator clears it. :func:`rank_peers` orders answers:
nodes of the requested build first, then partial seeds of other builds of the app; within each,
by score, then by how much they hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import PeerReport

__all__ = [
    "FLAG_REPORTERS",
    "RATE_HALF",
    "Candidate",
    "PeerQuality",
    "quality_score",
    "rank_peers",
    "update_quality",
]

#: Distinct reporters that must have seen corrupt data from a peer before it is flagged: one
#: reporter alone may be lying about an honest peer.
FLAG_REPORTERS = 3
#: Rate at which the speed part of the score is one half (bytes/s).
RATE_HALF = 1_000_000


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live swarm member as ranking sees it: the reference model of the stores' ranking
    (:func:`rank_peers`); what answers show of it is ``tracker_api.TrackerPeer``."""

    node_id: bytes
    manifest: bytes
    left: int
    score: float
    flagged: bool


@dataclass(slots=True)
class PeerQuality:
    """What reports have said about one peer; stores keep one per node id."""

    mib: float = 0.0
    failures: int = 0
    corrupt: int = 0
    rate: float = 0.0
    reports: int = 0
    corrupt_reporters: int = 0

    @property
    def flagged(self) -> bool:
        return self.corrupt_reporters >= FLAG_REPORTERS

    @property
    def score(self) -> float:
        return quality_score(self)


def quality_score(q: PeerQuality) -> float:
    """Score in [0, 1]: 70% reliability, 30% speed; 0.5 for an unknown peer, 0 when flagged.

    Reliability is a Laplace estimate over "units of evidence": each MiB received counts as a
    success, each failed request as a failure and each corrupt chunk as 16 failures (a corrupt
    chunk wastes the whole chunk and a verification). Speed is rate/(rate + RATE_HALF), 0.5 when
    no rate was reported yet. A few reports cannot push a peer to either extreme.
    """
    if q.flagged:
        return 0.0
    reliability = (1.0 + q.mib) / (2.0 + q.mib + q.failures + 16.0 * q.corrupt)
    speed = 0.5 if q.rate <= 0 else q.rate / (q.rate + RATE_HALF)
    return 0.7 * reliability + 0.3 * speed


def update_quality(q: PeerQuality, entry: PeerReport, *, new_corrupt_reporter: bool) -> None:
    """Fold one report entry into ``q`` (the same arithmetic the Redis script does)."""
    q.mib += entry.bytes / (1024 * 1024)
    q.failures += entry.failures
    q.corrupt += entry.corrupt
    if entry.bytes > 0 and entry.rate > 0:
        q.rate = float(entry.rate) if q.rate <= 0 else 0.7 * q.rate + 0.3 * entry.rate
    q.reports += 1
    if new_corrupt_reporter:
        q.corrupt_reporters += 1


def rank_peers(
    candidates: Iterable[Candidate], *, manifest: bytes, exclude: bytes, limit: int
) -> list[Candidate]:
    """The announce answer: no self, no flagged peers, one entry per node (its entry for the
    requested build wins), requested build first, then by score and how much each holds."""
    best: dict[bytes, Candidate] = {}
    for p in candidates:
        if p.node_id == exclude or p.flagged:
            continue
        seen = best.get(p.node_id)
        if seen is None or (p.manifest == manifest and seen.manifest != manifest):
            best[p.node_id] = p
    ordered = sorted(
        best.values(),
        key=lambda p: (p.manifest != manifest, -p.score, p.left, p.node_id),
    )
    return ordered[:limit]
