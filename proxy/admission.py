"""Admission control for one pool (pure logic: no I/O, clock injected).

A request either gets a slot at once, waits in its tier's bounded queue, or is refused. Slots are
limited by the pool's capacity (the ready workers' room) and by each tier's max_concurrent. When a
slot frees, the next waiter comes from the tier with the lowest virtual time (served / weight), so
tiers that all have work share by weight, and a tier with work always gets its turn eventually.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class TierPolicy:
    name: str
    weight: int
    max_concurrent: int
    max_queue: int
    queue_timeout_s: float


@dataclass
class Waiter:
    tier: str
    deadline: float
    token: object = None  # whatever the I/O layer needs to wake this waiter
    admitted: bool = False


@dataclass
class _TierState:
    policy: TierPolicy
    active: int = 0
    queue: collections.deque = field(default_factory=collections.deque)
    virtual_time: float = 0.0


class Decision:
    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


class Admission:
    def __init__(self, tiers: list[TierPolicy], clock: Callable[[], float]) -> None:
        self.clock = clock
        self.tiers = {t.name: _TierState(t) for t in tiers}
        self.capacity = 0
        self.active = 0

    def queued(self, tier: Optional[str] = None) -> int:
        if tier is not None:
            return len(self.tiers[tier].queue)
        return sum(len(t.queue) for t in self.tiers.values())

    def active_in(self, tier: str) -> int:
        return self.tiers[tier].active

    def _has_room(self, t: _TierState) -> bool:
        return self.active < self.capacity and t.active < t.policy.max_concurrent

    def arrive(self, tier: str, token: object = None) -> tuple[str, Optional[Waiter]]:
        t = self.tiers[tier]
        # Only skip the queue when nobody of this tier is already waiting (FIFO within a tier) and no
        # other tier is waiting for the same free slot.
        if self._has_room(t) and not self.queued():
            self._grant(t)
            return Decision.ADMIT, None
        if len(t.queue) >= t.policy.max_queue:
            return Decision.REJECT, None
        waiter = Waiter(tier, self.clock() + t.policy.queue_timeout_s, token)
        t.queue.append(waiter)
        return Decision.QUEUE, waiter

    def _grant(self, t: _TierState) -> None:
        # A tier that was idle must not bank credit: it restarts at the current minimum.
        busy = [o.virtual_time for o in self.tiers.values() if o is not t and (o.active or o.queue)]
        if not t.active and not t.queue and busy:
            t.virtual_time = max(t.virtual_time, min(busy))
        t.active += 1
        self.active += 1
        t.virtual_time += 1.0 / t.policy.weight

    def release(self, tier: str) -> list[Waiter]:
        """A request of `tier` finished. Returns the waiters admitted in its place."""
        t = self.tiers[tier]
        t.active -= 1
        self.active -= 1
        return self.dispatch()

    def set_capacity(self, capacity: int) -> list[Waiter]:
        self.capacity = capacity
        return self.dispatch()

    def abandon(self, waiter: Waiter) -> None:
        """The waiter left the queue (deadline, client gone)."""
        try:
            self.tiers[waiter.tier].queue.remove(waiter)
        except ValueError:
            pass

    def dispatch(self) -> list[Waiter]:
        admitted = []
        while True:
            candidates = [t for t in self.tiers.values() if t.queue and self._has_room(t)]
            if not candidates:
                return admitted
            t = min(candidates, key=lambda s: (s.virtual_time, -s.policy.weight))
            waiter = t.queue.popleft()
            self._grant(t)
            waiter.admitted = True
            admitted.append(waiter)

    def expected_wait_s(self, tier: str) -> float:
        """A rough Retry-After: the tier's queue timeout scaled by how full its queue is."""
        t = self.tiers[tier]
        return max(1.0, t.policy.queue_timeout_s * len(t.queue) / max(1, t.policy.max_queue))
