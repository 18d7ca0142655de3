"""A transfer's rate over a sliding window: the scheduler sizes pipelines and judges lateness
by it, the choker ranks peers by it."""

from __future__ import annotations

from collections import deque

__all__ = ["RateMeter"]


class RateMeter:
    """Bytes per second over a sliding window, for pipelines, ranking and peer reports."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._sum = 0
        self._start: float | None = None
        self.total = 0

    def start(self, now: float) -> None:
        """The transfer began (first request): the window never reaches back before it."""
        if self._start is None:
            self._start = now

    def add(self, nbytes: int, now: float) -> None:
        self.start(now)
        self._samples.append((now, nbytes))
        self._sum += nbytes
        self.total += nbytes
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            self._sum -= self._samples.popleft()[1]

    def rate(self, now: float) -> float:
        """0.0 until something arrived; the window is shorter while the transfer is young."""
        if self._start is None or not self.total:
            return 0.0
        self._trim(now)
        span = min(self.window, now - self._start)
        return self._sum / span if span > 0 else 0.0
