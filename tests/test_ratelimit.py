"""Token bucket (pure, explicit ``now``) and the trio limiter on a mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.ratelimit import RateLimiter, TokenBucket


def test_starts_full_then_charges_debt() -> None:
    b = TokenBucket(rate=100, burst=50, now=0)
    assert b.consume(50, 0) == 0  # the burst passes at once
    assert b.consume(10, 0) == pytest.approx(0.1)  # 10 bytes of debt at 100/s
    assert b.consume(10, 0) == pytest.approx(0.2)  # queued behind the first
    assert b.tokens(0.2) == pytest.approx(0)
    assert b.tokens(10) == 50  # refills up to the burst, not beyond


def test_a_request_bigger_than_the_burst_is_allowed_and_paid_for() -> None:
    b = TokenBucket(rate=1000, burst=10, now=0)
    assert b.consume(5000, 0) == pytest.approx(4.99)


def test_clock_going_backwards_changes_nothing() -> None:
    b = TokenBucket(rate=10, burst=10, now=5)
    b.consume(10, 5)
    assert b.tokens(1) == 0
    assert b.consume(0, 1) == 0


def test_set_rate_keeps_debt() -> None:
    b = TokenBucket(rate=100, burst=100, now=0)
    b.consume(300, 0)  # 200 of debt
    b.set_rate(200, None, 0)
    assert b.consume(0, 0) == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (float("inf"), 1)])
def test_rejects_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@given(
    rate=st.floats(1, 1e9),
    burst=st.floats(1, 1e9),
    steps=st.lists(st.tuples(st.floats(0, 10), st.integers(0, 10**9)), min_size=1, max_size=50),
)
def test_never_exceeds_rate_times_time_plus_burst(
    rate: float, burst: float, steps: list[tuple[float, int]]
) -> None:
    """Whoever acts only after the wait it was told never moves more than
    ``burst + rate * elapsed``; and the waits are not longer than the rate demands."""
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    total = 0
    for gap, n in steps:
        now += gap
        wait = b.consume(n, now)
        now += wait  # the caller sleeps, then moves its n bytes
        total += n
        assert total <= burst + rate * now + 1e-6 * (total + 1)
        # Not stingy: the debt is paid exactly when the bucket reaches zero.
        assert b.tokens(now) >= -1e-6 * (total + 1)


async def test_limiter_paces_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1_000_000, burst=100_000)
    start = trio.current_time()
    for _ in range(50):
        await limiter.acquire(100_000)
    # 5 MB at 1 MB/s, minus the initial burst.
    assert trio.current_time() - start == pytest.approx(4.9, rel=1e-6)


async def test_limiter_is_shared_fairly(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1000, burst=1)
    done: dict[str, float] = {}

    async def user(name: str) -> None:
        for _ in range(10):
            await limiter.acquire(100)
        done[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(user, name)
    # Four users of one 1000 B/s bucket move 4000 B in about 4 s, finishing close together.
    assert max(done.values()) - start == pytest.approx(4.0, abs=0.01)
    assert min(done.values()) - start > 3.5


async def test_unlimited_and_runtime_changes(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(None)
    start = trio.current_time()
    await limiter.acquire(10**12)
    assert trio.current_time() == start and limiter.rate is None
    limiter.set_rate(100, burst=1)
    await limiter.acquire(1)
    await limiter.acquire(100)
    assert trio.current_time() - start == pytest.approx(1.0)
    limiter.set_rate(None)
    await limiter.acquire(10**9)
    assert trio.current_time() - start == pytest.approx(1.0)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def _sleeper(limiter: RateLimiter, n: int, done: list[float]) -> None:
    await limiter.acquire(n)
    done.append(trio.current_time())


@pytest.mark.parametrize(
    ("new_rate", "finish"),
    [
        (None, 1.0),  # the cap lifted: released at once
        (10_000, 1.9),  # 9000 B of debt left, now paid at 10 kB/s
        (500, 19.0),  # a lower cap reaches the sleeper too
    ],
)
async def test_a_rate_change_reaches_callers_already_asleep(
    autojump_clock: trio.testing.MockClock, new_rate: float | None, finish: float
) -> None:
    limiter = RateLimiter(1000, burst=1)
    start = trio.current_time()
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sleeper, limiter, 10_001, done)  # 10 s of debt at 1000 B/s
        await trio.sleep(1)
        limiter.set_rate(new_rate, burst=1)
    assert done[0] - start == pytest.approx(finish, abs=1e-6)


async def test_sleepers_keep_their_order_and_the_total_rate_across_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(1000, burst=1)
    start = trio.current_time()
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_sleeper, limiter, 1000, done)  # the first 1 B is the burst
        await trio.sleep(0.5)
        limiter.set_rate(2000, burst=1)  # debts of 499, 1499, 2499 B left: the first is
        await trio.sleep(0.25)  # paid at 0.7495 s; then 999 and 1999 B at 4000 B/s
        limiter.set_rate(4000, burst=1)
    assert [t - start for t in done] == pytest.approx([0.7495, 0.99975, 1.24975], abs=1e-6)


async def test_lifted_then_capped_again_releases_the_old_sleepers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(10, burst=1)
    start = trio.current_time()
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sleeper, limiter, 1000, done)
        await trio.sleep(1)
        limiter.set_rate(None)
        limiter.set_rate(10, burst=1)  # before the sleeper ran: its debt was forgiven anyway
    assert done[0] - start == pytest.approx(1.0)
    assert limiter.rate == 10
