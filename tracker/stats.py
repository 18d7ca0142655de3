"""The shapes of ``/v1/stats``: per-release counters and the peer-quality summary, shared by
every swarm store so that they answer alike."""

from __future__ import annotations

from typing import Any

from .quality import PeerQuality, quality_score

__all__ = ["UNKNOWN_SCORE", "quality_stats", "release_stats", "score_histogram"]

#: The score of a peer nobody has reported on yet.
UNKNOWN_SCORE = quality_score(PeerQuality())


def score_histogram(scores: list[float]) -> list[int]:
    """Ten buckets over [0, 1]; bucket 9 includes 1.0."""
    hist = [0] * 10
    for s in scores:
        hist[min(9, max(0, int(s * 10)))] += 1
    return hist


def release_stats(
    m: bytes,
    app: str,
    seeders: int,
    leechers: int,
    completed: int,
    fp: int,
    fc: int,
    up: int,
    adoption: dict[bytes, list[list[int]]],
) -> dict[str, Any]:
    total = fp + fc
    return {
        "manifest_id": m.hex(),
        "app": app,
        "seeders": int(seeders or 0),
        "leechers": int(leechers or 0),
        "completed": int(completed),
        "bytes_from_peers": int(fp),
        "bytes_from_cdn": int(fc),
        "bytes_uploaded": int(up),
        "offload_ratio": (fp / total) if total else 0.0,
        "adoption": adoption.get(m, []),
    }


def quality_stats(scores: list[float], flagged: list[str]) -> dict[str, Any]:
    return {
        "peers_scored": len(scores),
        "histogram": score_histogram(scores),
        "flagged": flagged,
        "unknown_score": UNKNOWN_SCORE,
    }
