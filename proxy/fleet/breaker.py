"""Per-worker circuit breaker with outlier ejection (pure logic: no I/O, clock injected).

closed -> open after `consecutive_errors` connection-type failures (gone, timeout) or
`consecutive_5xx` internal errors; open for `base_eject_s` x times ejected (capped, jittered);
then half-open: one probe request at a time; a probe success closes it (and forgives), a probe
failure opens it again for longer. Envoy's outlier detection and Hystrix's breaker, in one object.
"""

from __future__ import annotations

import random
from typing import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class BreakerPolicy:
    def __init__(self, consecutive_errors: int = 5, consecutive_5xx: int = 3, base_eject_s: float = 30.0,
                 max_eject_s: float = 300.0, jitter: float = 0.1) -> None:
        self.consecutive_errors = consecutive_errors
        self.consecutive_5xx = consecutive_5xx
        self.base_eject_s = base_eject_s
        self.max_eject_s = max_eject_s
        self.jitter = jitter


class Breaker:
    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float], rng: random.Random | None = None) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng or random.Random()
        self.state = CLOSED
        self.errors = 0  # consecutive connection-type failures
        self.internal = 0  # consecutive 5xx-equivalents
        self.times_ejected = 0
        self.open_until = 0.0
        self.probing = False

    def reset(self) -> None:
        """A fresh process in the slot starts with a clean record."""
        self.state, self.errors, self.internal, self.probing = CLOSED, 0, 0, False
        self.times_ejected = 0

    def _refresh(self) -> None:
        if self.state == OPEN and self.clock() >= self.open_until:
            self.state = HALF_OPEN
            self.probing = False

    def available(self) -> bool:
        """May a request go to this worker now (without counting it as the probe)?"""
        self._refresh()
        return self.state == CLOSED or (self.state == HALF_OPEN and not self.probing)

    def on_dispatch(self) -> None:
        if self.state == HALF_OPEN:
            self.probing = True

    def record_success(self) -> None:
        self.errors = self.internal = 0
        if self.state != CLOSED:
            self.state = CLOSED
            self.probing = False
            self.times_ejected = 0

    def record_failure(self, internal: bool, may_eject: bool) -> bool:
        """Count a failure; returns True when it ejected the worker. `may_eject` is False when the
        pool already has as many workers ejected as it may (never more than half)."""
        self._refresh()
        if internal:
            self.internal += 1
        else:
            self.errors += 1
        tripped = self.state == HALF_OPEN or self.errors >= self.policy.consecutive_errors or \
            self.internal >= self.policy.consecutive_5xx
        if not tripped or not may_eject:
            if self.state == HALF_OPEN:
                self.probing = False
            return False
        self.times_ejected += 1
        duration = min(self.policy.base_eject_s * self.times_ejected, self.policy.max_eject_s)
        duration *= 1 + self.rng.uniform(-self.policy.jitter, self.policy.jitter)
        self.state = OPEN
        self.open_until = self.clock() + duration
        self.errors = self.internal = 0
        self.probing = False
        return True

    @property
    def ejected(self) -> bool:
        self._refresh()
        return self.state == OPEN
