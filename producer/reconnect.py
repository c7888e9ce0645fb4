"""Riding out a lost Redis connection: exponential backoff with jitter, within a time window and a deadline.

redis-py reconnects by itself on the next command; what a client needs on top is to keep trying
while Redis restarts (a few seconds), without hammering it, and to give up with a clear error
when the outage outlasts `reconnect_s` or the caller's own deadline.
"""

from __future__ import annotations

import random
import time

import redis

# BusyLoadingError (AOF loading) is a ConnectionError. On a cluster a failover or a reshard in progress
# answers CLUSTERDOWN / TRYAGAIN, or leaves a slot without a known master for a moment; redis-py follows
# MOVED and ASK by itself and raises these once its own retries are spent.
RETRYABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)
# what a Redis round trip can raise: redis-py's cluster client raises a few that are not RedisError
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, redis.exceptions.RedisClusterException)
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0


class Reconnect:
    """Counts consecutive failures; `delay(error)` says how long to wait, or raises when it is time to stop."""

    __slots__ = ("window_s", "deadline", "failures", "since")

    def __init__(self, window_s: float, deadline: float | None = None) -> None:
        self.window_s = window_s
        self.deadline = deadline  # time.monotonic() by which the caller wants an answer, or None
        self.failures = 0
        self.since: float | None = None

    def ok(self) -> None:
        self.failures, self.since = 0, None

    def delay(self, error: Exception) -> float:
        """After a failed call: seconds to sleep before the next try. Re-raises `error` past the window, and
        raises TimeoutError past the deadline (the caller's timeout wins over the reconnect window)."""
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        self.failures += 1
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError(f"Redis unreachable until the deadline ({type(error).__name__}: {error})") from error
        if now - self.since > self.window_s:
            raise error
        wait = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0)
        if self.deadline is not None:
            wait = min(wait, max(0.0, self.deadline - now))
        return wait
