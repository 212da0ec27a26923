"""Request rate limits per device: one token bucket per key, kept in this process.

Each replica keeps its own buckets (no shared state, no I/O: the check runs on the event loop), so a
device spreading its calls over N replicas may make N times the rate. That is enough for what the limit
is for, keeping one misbehaving device from flooding the database; it is not a global quota.

Memory stays bounded: a bucket that has refilled completely knows nothing a fresh one would not, so it is
dropped; and at most ``max_keys`` buckets are kept (the least recently used go first, which at worst
gives an evicted caller a fresh burst).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from server.domain.errors import RateLimitedError


class TokenBucketLimiter:
    """``rate_per_s`` requests per second on average and ``burst`` at once, per key; rate 0: no limit."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"need rate_per_s >= 0, burst >= 1 and max_keys >= 1, got {rate_per_s}, {burst}, "
                             f"{max_keys}")
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, when they were counted); ordered by last use, least recent first.
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        """Takes one token for ``key``: 0.0 when the request may go ahead, else the seconds until it may
        (a refused request takes nothing, so a caller that backs off is let through again)."""
        if not self.rate_per_s:
            return 0.0
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            tokens, counted = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - counted) * self.rate_per_s)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate_per_s
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return wait

    def waiting(self, key: Hashable) -> float:
        """Seconds until ``key`` has a token again (0.0: it has one); takes nothing."""
        if not self.rate_per_s:
            return 0.0
        with self._lock:
            if key not in self._buckets:
                return 0.0
            tokens, counted = self._buckets[key]
            tokens = min(float(self.burst), tokens + (self._clock() - counted) * self.rate_per_s)
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s

    def check(self, key: Hashable, what: str) -> None:
        """Takes a token for ``key`` or raises RateLimitedError saying when to retry; ``what`` names the caller."""
        wait = self.take(key)
        if wait:
            raise RateLimitedError(
                f"{what} exceeded its rate limit of {self.rate_per_s:g} requests/s (burst {self.burst}); "
                f"retry in {wait:.1f} s", retry_after_s=wait)

    def _evict_idle(self, now: float) -> None:
        # Least recently used first, stopping at the first bucket not yet full again: cheap on every call, and
        # a full bucket further on goes in a later sweep (or to max_keys).
        while self._buckets:
            key, (tokens, counted) = next(iter(self._buckets.items()))
            if tokens + (now - counted) * self.rate_per_s < self.burst:
                return
            del self._buckets[key]
