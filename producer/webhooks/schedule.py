"""When each delivery attempt is due: Standard Webhooks' schedule, with jitter every replica agrees on.

The schedule lists the wait before each attempt, counted from the end of the one before it (the first
is 0: at once). After the last attempt fails the event is given up. Jitter spreads retries so that a
receiver coming back is not hit by every missed event in the same second; it is derived from the entry,
the endpoint and the attempt rather than drawn at random, because every replica's sweep asks when an
entry is due and a fresh draw per ask would make the earliest draw win.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
STANDARD_SCHEDULE = "0,5,300,1800,7200,18000,36000,36000"
JITTER = 0.1  # up to 10 % later than the schedule says


@dataclass(slots=True, frozen=True)
class RetrySchedule:
    delays_s: tuple[float, ...]
    jitter: float = JITTER

    @classmethod
    def parse(cls, text: str, jitter: float = JITTER) -> RetrySchedule:
        """`"0,5,300"`: three attempts, at once, 5 s after the first fails, 5 min after the second."""
        try:
            delays = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"webhook_retry_schedule: {text!r} must be comma-separated seconds") from None
        if not delays or any(not d >= 0 for d in delays):
            raise ValueError(f"webhook_retry_schedule: {text!r} must list one or more delays >= 0")
        return cls(delays, jitter)

    @property
    def attempts(self) -> int:
        return len(self.delays_s)

    def exhausted(self, attempts_made: int) -> bool:
        return attempts_made >= self.attempts

    def wait_before(self, attempt: int, salt: str) -> float:
        """Seconds to wait before attempt number `attempt` (1-based), jitter included."""
        delay = self.delays_s[min(attempt, self.attempts) - 1]
        digest = hashlib.sha256(f"{salt}|{attempt}".encode()).digest()
        return delay * (1 + self.jitter * int.from_bytes(digest[:4], "big") / 2**32)
