"""Per-device token buckets: a burst goes through, then the rate; idle buckets are forgotten; memory is bounded."""

from __future__ import annotations

import pytest

from server.domain.errors import RateLimitedError
from server.services.rate_limits import TokenBucketLimiter


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_admitted_then_requests_wait_for_the_rate() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(2.0, 3, clock=clock)
    assert [limiter.take("d") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("d") == pytest.approx(0.5)  # one token every 0.5 s at 2/s
    clock.now += 0.5
    assert limiter.take("d") == 0.0
    assert limiter.take("d") == pytest.approx(0.5)


def test_a_refused_request_takes_no_token_so_a_caller_that_waits_gets_through() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(1.0, 1, clock=clock)
    assert limiter.take("d") == 0.0
    for _ in range(10):  # hammering while empty does not push the next admission further away
        assert limiter.take("d") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.take("d") == 0.0


def test_devices_have_buckets_of_their_own() -> None:
    limiter = TokenBucketLimiter(1.0, 1, clock=Clock())
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0


def test_check_raises_rate_limited_with_the_retry_hint_and_the_limit() -> None:
    limiter = TokenBucketLimiter(4.0, 1, clock=Clock())
    limiter.check("d", "device d")
    with pytest.raises(RateLimitedError, match=r"device d exceeded its rate limit of 4 requests/s \(burst 1\); "
                                               r"retry in 0\.2 s") as caught:
        limiter.check("d", "device d")
    assert caught.value.retry_after_s == pytest.approx(0.25) and caught.value.retryable


def test_rate_zero_turns_the_limit_off() -> None:
    limiter = TokenBucketLimiter(0, 1, clock=Clock())
    assert all(limiter.take("d") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_buckets_that_refilled_are_forgotten_and_the_count_is_capped() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(1.0, 2, max_keys=100, clock=clock)
    for k in range(50):
        limiter.take(f"d{k}")
    assert len(limiter) == 50
    clock.now += 2.0  # long enough for every bucket to be full again
    limiter.take("late")
    assert len(limiter) == 1
    for k in range(500):  # a flood of distinct callers (say, made-up enrolment names) at one instant
        limiter.take(f"x{k}")
    assert len(limiter) == 100


def test_bad_limits_are_refused_with_their_values() -> None:
    with pytest.raises(ValueError, match="burst >= 1"):
        TokenBucketLimiter(1.0, 0)
    with pytest.raises(ValueError, match="rate_per_s >= 0"):
        TokenBucketLimiter(-1.0, 5)


def test_waiting_tells_how_long_until_a_token_without_taking_one() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(2.0, 2, clock=clock)
    assert limiter.waiting("host") == 0.0  # an unknown key has its whole burst
    limiter.take("host")
    limiter.take("host")

    assert limiter.waiting("host") == pytest.approx(0.5)
    assert limiter.waiting("host") == pytest.approx(0.5)  # asking took nothing
    clock.now += 0.5
    assert limiter.waiting("host") == 0.0
    assert TokenBucketLimiter(0, 1).waiting("host") == 0.0  # rate 0: no limit
