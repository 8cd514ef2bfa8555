"""The asyncio side of admission: wraps the pure Admission of each pool with futures and deadlines.
The pools' capacity is pushed in by PoolState (set_capacity) whenever it may have changed."""

from __future__ import annotations

import asyncio
import time

from proxy.serving.admission import Admission, Decision, TierPolicy
from proxy.config import Tier
from proxy.errors import NoWorkerReady, Overloaded


class Ticket:
    __slots__ = ("pool", "tier", "cost", "queued_s", "released")

    def __init__(self, pool: str, tier: str, cost: int, queued_s: float) -> None:
        self.pool = pool
        self.tier = tier
        self.cost = cost
        self.queued_s = queued_s
        self.released = False


class Gate:
    """Owns the `tiers` section's admission settings and one Admission per pool."""

    def __init__(self, tiers: list[Tier], pool_names: list[str]) -> None:
        self.admissions: dict[str, Admission] = {}
        self._recent_wait: dict[str, float] = {}  # pool -> moving average of queue waits (s)
        self.reconfigure(tiers, pool_names)

    def reconfigure(self, tiers: list[Tier], pool_names: list[str]) -> None:
        policies = [TierPolicy(t.name, t.weight, t.max_concurrent, t.max_queue, t.queue_timeout_s) for t in tiers]
        for pool in pool_names:
            admission = self.admissions.get(pool)
            if admission is None:
                self.admissions[pool] = Admission(policies, time.monotonic)
            else:
                _wake(admission.update_policies(policies))

    def expected_wait_s(self, pool: str) -> float:
        return self._recent_wait.get(pool, 0.0)

    def _observe_wait(self, pool: str, waited: float) -> None:
        self._recent_wait[pool] = 0.8 * self._recent_wait.get(pool, 0.0) + 0.2 * waited

    def queue_depth(self, pool: str) -> int:
        admission = self.admissions.get(pool)
        return admission.queued() if admission is not None else 0

    def set_capacity(self, pool: str, requests: int, tokens: int) -> None:
        """What the pool's ready workers can hold now (from PoolState); waiters that fit are woken."""
        admission = self.admissions.get(pool)
        if admission is not None and (requests, tokens) != (admission.capacity, admission.token_capacity):
            _wake(admission.set_capacity(requests, tokens))

    async def acquire(self, pool: str, tier: str, key: str, cost: int) -> Ticket:
        """Admit now, or wait in the tier's queue until admitted or the deadline passes. Raises
        Overloaded (429) or NoWorkerReady (503), both with Retry-After, in either case at once."""
        admission = self.admissions[pool]
        if admission.capacity == 0:
            raise NoWorkerReady("No worker is ready to serve this model; retry shortly.", retry_after=1.0)
        decision, waiter, evicted = admission.arrive(tier, key, cost)
        for victim in evicted:  # pushed out by this higher-tier arrival: refused now, not at its deadline
            _wake([victim])
        if decision == Decision.ADMIT:
            self._observe_wait(pool, 0.0)
            return Ticket(pool, tier, cost, 0.0)
        if decision == Decision.REJECT:
            why = "the wait would outlast the queue deadline" if admission.hopeless(tier) else "queue full"
            raise self._refusal(pool, admission, tier, why)
        started = time.monotonic()
        waiter.token = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(max(0.0, waiter.deadline - started)):
                await waiter.token
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.admitted:
                # Admitted in the same instant we gave up: hand the slot straight back.
                _wake(admission.release(tier, cost))
            else:
                admission.abandon(waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._refusal(pool, admission, tier, "queue deadline passed") from None
        if waiter.evicted:
            raise self._refusal(pool, admission, tier, "a higher tier needed the queue place")
        waited = time.monotonic() - started
        self._observe_wait(pool, waited)
        return Ticket(pool, tier, cost, waited)

    def release(self, ticket: Ticket) -> None:
        if not ticket.released:
            ticket.released = True
            _wake(self.admissions[ticket.pool].release(ticket.tier, ticket.cost))

    def _refusal(self, pool: str, admission: Admission, tier: str, why: str):
        retry = admission.expected_wait_s(tier)
        if admission.capacity == 0:  # no ready worker
            return NoWorkerReady("No worker is ready to serve this model; retry shortly.", retry_after=retry)
        return Overloaded(f"The server is at capacity ({why}); retry after the indicated time.", retry_after=retry)


def _wake(waiters) -> None:
    for waiter in waiters:
        fut = waiter.token
        if fut is not None and not fut.done():
            fut.set_result(None)
