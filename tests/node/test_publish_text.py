"""What ``p2pnode publish --tracker`` prints of the tracker's answer, for people."""

from __future__ import annotations

from p2pnode.node.render import tracker_lines


def test_a_staged_publish_says_who_gets_it_and_how_to_steer_it() -> None:
    answer = {
        "app": "game",
        "channel": "stable",
        "seq": 7,
        "build": 4,
        "rollout": {"percent": 20.0, "threshold": 0.05, "min_outcomes": 20},
        "forecast": {
            "adopters": 40.2,
            "channel": "stable",
            "need_bytes": 3,
            "cdn_total": 121,
            "cdn_peak_per_min": 60,
        },
    }
    moved, staged, forecast = tracker_lines(answer)
    assert moved == "tracker: game/stable moved to build 4 (seq 7)"
    assert "offered to 20% of stable's nodes" in staged and "the others keep" in staged
    assert "5% of at least 20 outcomes" in staged
    assert "tracker rollout game stable show|raise PERCENT|halt|resume|complete" in staged
    assert forecast.startswith("forecast: about 40 nodes on stable x 3 B each -> CDN egress 121 B")
    # a plain publish: no rollout line; an old tracker without a forecast: no forecast line
    plain = {k: v for k, v in answer.items() if k not in ("rollout", "forecast")}
    assert tracker_lines(plain) == [moved]
    assert tracker_lines({}) == []
