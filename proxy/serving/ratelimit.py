"""Per-key token buckets: requests per second and tokens per minute (pure logic, clock injected)."""

from __future__ import annotations

from typing import Callable


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.clock = clock
        self.level = burst
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Take `amount` now and return 0, or take nothing and return the seconds until it fits."""
        self._refill()
        if self.level >= amount or self.level >= self.burst:
            # A request bigger than the whole bucket may still pass when the bucket is full (it then
            # goes into debt), so that no single request is refused forever.
            self.level -= amount
            return 0.0
        return (min(amount, self.burst) - self.level) / self.rate

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.burst, self.level + amount)


class KeyLimits:
    """The buckets of one API key; either may be absent (unlimited)."""

    def __init__(self, rps: float | None, tpm: int | None, clock: Callable[[], float],
                 burst: int | None = None) -> None:
        self.settings = (rps, tpm, burst)
        self.requests = TokenBucket(rps, float(burst or max(1.0, rps)), clock) if rps else None
        self.tokens = TokenBucket(tpm / 60.0, float(tpm), clock) if tpm else None

    def admit(self, cost: int) -> float:
        """0 when the request may go (and is charged), else the seconds to wait (nothing charged)."""
        if self.requests is not None:
            wait = self.requests.take(1)
            if wait:
                return wait
        if self.tokens is not None:
            wait = self.tokens.take(cost)
            if wait:
                if self.requests is not None:
                    self.requests.give_back(1)
                return wait
        return 0.0

    def refund(self, tokens: int) -> None:
        if self.tokens is not None and tokens > 0:
            self.tokens.give_back(tokens)
