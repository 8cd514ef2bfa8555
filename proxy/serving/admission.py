"""Admission control for one pool (pure logic: no I/O, clock injected).

A request either gets a slot at once, waits in its tier's bounded queue, or is refused. Slots are
limited by the pool's capacity (the ready workers' room, in requests and in estimated tokens) and
by each tier's max_concurrent. When a slot frees, the next waiter comes from the tier with the
lowest virtual time (cost served / weight), so tiers that all have work share by weight, and any
tier with work gets its turn. Inside a tier, each API key has its own queue and the key with the
least recent usage (tokens, decaying) goes first, so one key flooding its tier cannot starve the
other keys. Cost is the request's estimated tokens (prompt + max_tokens), so one huge request
counts as much as the many small ones it displaces.

Overload order: tiers are ranked by their order in the config (first = highest). When a tier's
queue is full, an arrival pushes out the newest waiter of the lowest-ranked tier below it that has
one (that waiter is refused at once); only when no lower tier has anyone waiting is the arrival
itself refused. So under a burst the lowest tier is shed first, and the highest tier is refused
only when nothing below it is queued.

Hopeless waits are refused at arrival: from the rate at which requests have been finishing (the
last RATE_WINDOW_S, once at least RATE_MIN_SAMPLES finished), an arrival that would wait behind
more requests than can finish before its queue deadline gets 429 at once instead of timing out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

RATE_WINDOW_S = 10.0
RATE_MIN_SAMPLES = 16


@dataclass
class TierPolicy:
    name: str
    weight: int
    max_concurrent: int
    max_queue: int
    queue_timeout_s: float


@dataclass(eq=False)
class Waiter:
    tier: str
    key: str
    cost: int
    deadline: float
    token: object = None  # whatever the I/O layer needs to wake this waiter
    admitted: bool = False
    evicted: bool = False  # pushed out of its queue by a higher tier's arrival
    seq: int = 0  # arrival order (the newest waiter is pushed out first)


@dataclass
class _TierState:
    policy: TierPolicy
    active: int = 0
    queued: int = 0
    queues: dict = field(default_factory=dict)  # key -> deque of Waiter, in arrival order of keys
    virtual_time: float = 0.0


class Decision:
    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


class Admission:
    def __init__(self, tiers: list[TierPolicy], clock: Callable[[], float], usage_half_life_s: float = 10.0) -> None:
        self.clock = clock
        self.tiers = {t.name: _TierState(t) for t in tiers}
        self.capacity = 0
        self.token_capacity = 0
        self.active = 0
        self.active_tokens = 0
        self.half_life = usage_half_life_s
        self._usage: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._arrivals = 0
        self._finished: collections.deque[float] = collections.deque(maxlen=1024)  # clock() of releases

    # --- reading --------------------------------------------------------------------------------
    def queued(self, tier: Optional[str] = None) -> int:
        if tier is not None:
            return self.tiers[tier].queued
        return sum(t.queued for t in self.tiers.values())

    def active_in(self, tier: str) -> int:
        return self.tiers[tier].active

    def usage(self, key: str) -> float:
        value, when = self._usage.get(key, (0.0, 0.0))
        return value * 0.5 ** ((self.clock() - when) / self.half_life)

    def expected_wait_s(self, tier: str) -> float:
        """A rough Retry-After: the tier's queue timeout scaled by how full its queue is."""
        t = self.tiers[tier]
        return max(1.0, t.policy.queue_timeout_s * t.queued / max(1, t.policy.max_queue))

    # --- changing -------------------------------------------------------------------------------
    def update_policies(self, tiers: list[TierPolicy]) -> list[Waiter]:
        """A reloaded config: new limits and weights apply from now on; running and queued requests stay."""
        for policy in tiers:
            state = self.tiers.get(policy.name)
            if state is None:
                self.tiers[policy.name] = _TierState(policy)
            else:
                state.policy = policy
        return self.dispatch()

    def set_capacity(self, capacity: int, token_capacity: int) -> list[Waiter]:
        self.capacity = capacity
        self.token_capacity = token_capacity
        return self.dispatch()

    def arrive(self, tier: str, key: str = "", cost: int = 1) -> tuple[str, Optional[Waiter], list[Waiter]]:
        """(decision, the waiter if queued, the lower-tier waiters pushed out to make room - the
        caller refuses those at once)."""
        t = self.tiers[tier]
        # Skip the queue only when nobody waits: no overtaking within or across tiers.
        if not self.queued() and self._room(t, cost):
            self._grant(t, key, cost)
            return Decision.ADMIT, None, []
        evicted: list[Waiter] = []
        if self.hopeless(tier):
            return Decision.REJECT, None, []
        if t.queued >= t.policy.max_queue:
            victim = self._newest_below(tier)
            if victim is None:
                return Decision.REJECT, None, []
            self.abandon(victim)
            victim.evicted = True
            evicted.append(victim)
        self._arrivals += 1
        waiter = Waiter(tier, key, cost, self.clock() + t.policy.queue_timeout_s, seq=self._arrivals)
        t.queues.setdefault(key, collections.deque()).append(waiter)
        t.queued += 1
        return Decision.QUEUE, waiter, evicted

    def _newest_below(self, tier: str) -> Optional[Waiter]:
        """The newest waiter of the lowest-ranked tier below `tier` that has waiters."""
        names = list(self.tiers)
        for name in reversed(names[names.index(tier) + 1:]):
            lower = self.tiers[name]
            if lower.queued:
                return max((q[-1] for q in lower.queues.values() if q), key=lambda w: w.seq)
        return None

    def finish_rate(self) -> float | None:
        """Requests finished per second lately; None until enough have finished to tell."""
        now, finished = self.clock(), self._finished
        while finished and now - finished[0] > RATE_WINDOW_S:  # forget what left the window
            finished.popleft()
        if len(finished) < RATE_MIN_SAMPLES:
            return None
        return len(finished) / max(now - finished[0], 1e-3)

    def hopeless(self, tier: str) -> bool:
        """Would an arrival in `tier` wait past its deadline? It waits behind everyone queued in its
        tier and the tiers above it (lower tiers yield to it)."""
        rate = self.finish_rate()
        if rate is None:
            return False
        names = list(self.tiers)
        ahead = sum(self.tiers[name].queued for name in names[:names.index(tier) + 1])
        return (ahead + 1) / rate > self.tiers[tier].policy.queue_timeout_s

    def release(self, tier: str, cost: int = 1) -> list[Waiter]:
        """A request of `tier` finished. Returns the waiters admitted in its place."""
        self._finished.append(self.clock())
        t = self.tiers[tier]
        t.active -= 1
        self.active -= 1
        self.active_tokens -= cost
        return self.dispatch()

    def abandon(self, waiter: Waiter) -> None:
        """The waiter left the queue (deadline passed, client gone)."""
        t = self.tiers[waiter.tier]
        q = t.queues.get(waiter.key)
        if q is not None and waiter in q:
            q.remove(waiter)
            t.queued -= 1
            if not q:
                del t.queues[waiter.key]

    def dispatch(self) -> list[Waiter]:
        admitted = []
        while True:
            candidates = [t for t in self.tiers.values()
                          if t.queued and self.active < self.capacity and t.active < t.policy.max_concurrent]
            if not candidates:
                return admitted
            t = min(candidates, key=lambda s: (s.virtual_time, -s.policy.weight))
            key = min(t.queues, key=self.usage)  # ties: the key that has waited longest
            queue = t.queues[key]
            waiter = queue[0]
            if not self._room(t, waiter.cost):
                return admitted  # the chosen request waits for tokens to free; nobody overtakes it
            queue.popleft()
            if not queue:
                del t.queues[key]
            t.queued -= 1
            self._grant(t, key, waiter.cost)
            waiter.admitted = True
            admitted.append(waiter)

    # --- internals ------------------------------------------------------------------------------
    def _room(self, t: _TierState, cost: int) -> bool:
        if self.active >= self.capacity or t.active >= t.policy.max_concurrent:
            return False
        # A request larger than the whole token budget still runs, alone.
        return self.active_tokens + cost <= self.token_capacity or self.active == 0

    def _grant(self, t: _TierState, key: str, cost: int) -> None:
        # A tier that was idle must not bank credit: it restarts at the busy tiers' minimum.
        busy = [o.virtual_time for o in self.tiers.values() if o is not t and (o.active or o.queued)]
        if not t.active and not t.queued and busy:
            t.virtual_time = max(t.virtual_time, min(busy))
        t.active += 1
        self.active += 1
        self.active_tokens += cost
        t.virtual_time += cost / t.policy.weight
        self._usage[key] = (self.usage(key) + cost, self.clock())
