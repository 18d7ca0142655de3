"""How each CDN mirror is doing: its rate, its run of failures, its cooldown, and the order
the plan prefers mirrors in; and the backoff before a chunk returns to a mirror that failed it.

Sans-IO: time is passed in as ``now``, jitter comes from the caller's ``random.Random``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MirrorHealth", "RateMeter", "backoff_delay"]


class RateMeter:
    """Bytes per second over a sliding window of ``window`` seconds, in ``slots`` buckets."""

    __slots__ = ("_buckets", "_slot", "_slots", "_start", "_width")

    def __init__(self, window: float = 1.0, slots: int = 10, now: float = 0.0) -> None:
        self._width = window / slots
        self._slots = slots
        self._buckets: deque[int] = deque([0] * slots, maxlen=slots)
        self._slot = int(now / self._width)
        self._start = now

    def _advance(self, now: float) -> None:
        slot = int(now / self._width)
        if slot > self._slot:
            for _ in range(min(slot - self._slot, self._slots)):
                self._buckets.append(0)
            self._slot = slot

    @property
    def started(self) -> float:
        return self._start

    def add(self, n: int, now: float) -> None:
        self._advance(now)
        self._buckets[-1] += n

    def rate(self, now: float) -> float:
        """The average over the window, or over the time since creation if that is shorter."""
        self._advance(now)
        span = min(self._width * self._slots, max(now - self._start, self._width))
        return sum(self._buckets) / span


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter (uniform in [0, min(cap, base * 2**attempt)]):
    spreads retries of many clients after a shared outage instead of synchronising them."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 30))))


@dataclass
class _Mirror:
    url: str
    consecutive_failures: int = 0
    cooldowns: int = 0
    cooldown_until: float = float("-inf")
    active: int = 0
    ignores_range: bool = False
    answered: bool = False  # has answered a request (so whether it honours Range is known)
    rate: float = 0.0  # EWMA of bytes per second over finished jobs


class MirrorHealth:
    """Per-mirror failure counting, cooldowns and preference order.

    Args:
        mirrors: mirror roots, in the caller's order of preference (ties keep this order).
        failure_threshold: consecutive failures that put a mirror on cooldown.
        cooldown_base: first cooldown, doubled at each further cooldown, up to ``cooldown_cap``.
    """

    def __init__(
        self,
        mirrors: Sequence[str],
        *,
        failure_threshold: int = 2,
        cooldown_base: float = 1.0,
        cooldown_cap: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not mirrors:
            raise ValueError("at least one mirror is needed")
        self._m = [_Mirror(u) for u in mirrors]
        self.threshold = failure_threshold
        self.base = cooldown_base
        self.cap = cooldown_cap
        self._rng = rng or random.Random()

    def __len__(self) -> int:
        return len(self._m)

    def url(self, i: int) -> str:
        return self._m[i].url

    def available(self, i: int, now: float) -> bool:
        return self._m[i].cooldown_until <= now

    def cooldown_until(self, i: int) -> float:
        return self._m[i].cooldown_until

    def order(self, now: float) -> list[int]:
        """Mirrors not on cooldown, best first."""
        ms = [i for i, m in enumerate(self._m) if m.cooldown_until <= now]
        return sorted(
            ms,
            key=lambda i: (
                self._m[i].consecutive_failures > 0,
                self._m[i].ignores_range,
                self._m[i].active,
                -self._m[i].rate,
                i,
            ),
        )

    def started(self, i: int) -> None:
        self._m[i].active += 1

    def stopped(self, i: int) -> None:
        self._m[i].active -= 1

    def success(self, i: int, nbytes: int, seconds: float) -> None:
        m = self._m[i]
        m.consecutive_failures = 0
        m.cooldowns = 0
        if seconds > 0 and nbytes > 0:
            sample = nbytes / seconds
            m.rate = sample if m.rate == 0 else 0.7 * m.rate + 0.3 * sample

    def failure(self, i: int, now: float, *, immediate: bool = False) -> None:
        """Count a failure; ``immediate`` (connection refused) cools down at once."""
        m = self._m[i]
        if m.cooldown_until > now:
            # Requests in flight when the mirror went down report one by one; one outage is
            # one cooldown step, not one per request.
            return
        m.consecutive_failures += 1
        if immediate or m.consecutive_failures >= self.threshold:
            span = min(self.cap, self.base * 2.0**m.cooldowns)
            m.cooldowns += 1
            # "Equal jitter": at least half the span, so a cooldown is never ~0.
            m.cooldown_until = now + span / 2 + self._rng.uniform(0, span / 2)

    def mark_ignores_range(self, i: int) -> None:
        self._m[i].ignores_range = True

    def answered(self, i: int) -> bool:
        return self._m[i].answered

    def mark_answered(self, i: int) -> None:
        self._m[i].answered = True


# --------------------------------------------------------------------------------------------
# The plan
