"""Bandwidth caps: a sans-IO token bucket and a thin trio helper that sleeps for it.

Theory of operation
-------------------
A :class:`TokenBucket` holds up to ``burst`` tokens (bytes) and refills at ``rate`` tokens per
second. :meth:`TokenBucket.consume` *debits* ``n`` tokens at once, letting the balance go
negative, and returns how long the caller must wait before the debt is paid off. Debiting first
and waiting after (rather than waiting until ``n`` tokens exist) has two properties we need:

* a consumer may take more than ``burst`` in one call (a 64 KiB socket read under a 16 KiB
  burst) without deadlocking, and the long-run rate is still exactly ``rate``;
* concurrent consumers queue up fairly: each debit pushes the next caller's wait further out,
  so N connections sharing one bucket share its rate instead of each getting it.

Time is passed in as ``now`` (any monotonic clock in seconds), so the bucket is pure and is unit
tested with explicit times; :class:`RateLimiter` supplies ``trio.current_time()`` and sleeps.
The swarm uses the same classes for per-peer and global upload/download caps: a transfer
awaits every limiter that applies to it (``await peer_limit.acquire(n)`` then
``await global_limit.acquire(n)``).
"""

from __future__ import annotations

import math

import trio

__all__ = ["RateLimiter", "TokenBucket"]


class TokenBucket:
    """A debit-style token bucket.

    Args:
        rate: tokens (bytes) added per second; must be > 0.
        burst: the most tokens that can accumulate while idle; must be > 0. The bucket starts
            full, so the first ``burst`` bytes pass without waiting.
        now: the clock reading at creation.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, not {rate!r}")
        if not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"burst must be a positive finite number, not {burst!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def _refill(self, now: float) -> None:
        # A clock that steps backwards (it should not, but tests may pass anything) neither
        # adds nor removes tokens.
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def tokens(self, now: float) -> float:
        """The balance at ``now``: negative while a debt is outstanding."""
        self._refill(now)
        return self._tokens

    def consume(self, n: float, now: float) -> float:
        """Debit ``n`` tokens; return the seconds to wait before acting on them (0 if none)."""
        if n < 0:
            raise ValueError(f"cannot consume a negative amount ({n!r})")
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def set_rate(self, rate: float, burst: float | None, now: float) -> None:
        """Change the rate (and burst) at run time, keeping the current balance and debt."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, not {rate!r}")
        self._refill(now)
        self._rate = float(rate)
        if burst is not None:
            if not (burst > 0 and math.isfinite(burst)):
                raise ValueError(f"burst must be a positive finite number, not {burst!r}")
            self._burst = float(burst)
            self._tokens = min(self._tokens, self._burst)


def default_burst(rate: float) -> float:
    """A burst of 50 ms of traffic, at least 16 KiB: small enough that a cap looks flat on
    any graph with 1 s resolution, large enough not to sleep for every socket read."""
    return max(16 * 1024.0, rate * 0.05)


class RateLimiter:
    """An optional shared cap; ``RateLimiter(None)`` is unlimited and costs one checkpoint.

    The cap may change at any time (:meth:`set_rate`: a bandwidth schedule applying its caps
    live), and the change reaches callers already asleep on a debt, not only later ones: a
    1 MiB read debited at 50 KiB/s sleeps 20 s, and lifting the cap must not leave it asleep
    for those 20 s. Each sleeper knows its place in the debt queue as a *target*: the number of
    tokens the bucket will have refilled, since it was made, when this sleeper's debt is paid.
    Refills are linear in time at the current rate, so after a change each sleeper recomputes
    its deadline from the same target at the new rate (a lower cap pushes it out, a higher one
    pulls it in, no cap releases it), and the sleepers keep their order and the total rate.

    Args:
        rate: bytes per second, or ``None`` for no limit.
        burst: see :class:`TokenBucket`; defaults to :func:`default_burst`.
    """

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self._bucket: TokenBucket | None = None
        # Tokens refilled up to ``_stamp`` (at the rates in force so far), for sleepers' targets.
        self._refilled = 0.0
        self._stamp = 0.0
        # Bumped when the cap is lifted: the targets of an earlier bucket mean nothing to a new one.
        self._epoch = 0
        self._changed: trio.Event | None = None
        if rate is not None:
            self._new_bucket(rate, burst)

    def _new_bucket(self, rate: float, burst: float | None) -> None:
        now = _now()
        self._bucket = TokenBucket(rate, burst if burst is not None else default_burst(rate), now)
        self._refilled, self._stamp = 0.0, now

    @property
    def rate(self) -> float | None:
        return None if self._bucket is None else self._bucket.rate

    def _refilled_at(self, bucket: TokenBucket, now: float) -> float:
        return self._refilled + (now - self._stamp) * bucket.rate

    async def acquire(self, n: int) -> None:
        """Account for ``n`` bytes already moved (or about to be) and sleep off any debt."""
        bucket = self._bucket
        if bucket is None:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        wait = bucket.consume(n, now)
        if wait <= 0:
            await trio.lowlevel.checkpoint()
            return
        target = self._refilled_at(bucket, now) + wait * bucket.rate
        epoch = self._epoch
        while True:
            if self._changed is None:
                self._changed = trio.Event()
            changed = self._changed
            with trio.move_on_at(self._stamp + (target - self._refilled) / bucket.rate) as scope:
                await changed.wait()
            if scope.cancelled_caught:
                return  # paid off at the rate in force
            bucket = self._bucket  # set_rate may have lifted it
            if bucket is None or self._epoch != epoch:
                return

    def set_rate(self, rate: float | None, burst: float | None = None) -> None:
        """Change or lift the cap at run time; callers asleep on a debt follow the change."""
        if rate is None:
            if self._bucket is not None:
                self._bucket = None
                self._epoch += 1
        elif self._bucket is None:
            self._new_bucket(rate, burst)
        else:
            now = _now()
            self._refilled, self._stamp = self._refilled_at(self._bucket, now), now
            self._bucket.set_rate(rate, burst if burst is not None else default_burst(rate), now)
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def _now() -> float:
    # Limiters may be built outside trio.run (configuration objects); fall back to 0 there and
    # let the first refill catch up from the trio clock.
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0
