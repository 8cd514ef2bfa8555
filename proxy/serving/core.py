"""The serving core: what every request goes through once it is planned, whether it came over
HTTP or from the job runner. It applies the key's rate limit, then answers from the cache, joins an
identical request in flight (coalescing, in this host and then across hosts), or admits the request
and runs its generation on the workers (with failover and stream resume: generation.py). The
Answer it returns (answer.py) yields batches of frames - Tokens,
the last batch ending with one Finished - or None for "idle, send a keepalive", and formats
nothing: that is the caller's part. A batch is everything that arrived since the caller last
looked, so a caller that falls behind catches up in one step.

It is the one writer of these facts of a RequestRecord: cache outcome, queue wait, the worker and
model that served, time to the first token, token counts and failovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Callable

from backend.protocol import Finished
from proxy.config import ApiKey, Cache, Routing, Tier, Timeouts
from proxy.errors import Overloaded
from proxy.fleet.pool import Ejection, PoolState
from proxy.metrics import Metrics
from proxy.serving.answer import Answer, served_by_worker
from proxy.serving.cache import AnswerCache, CachedAnswer
from proxy.serving.coalesce import Coalescer, Flight
from proxy.serving.degrade import Degrader, Load
from proxy.serving.gate import Gate
from proxy.serving.generation import Generation, RetryBudget
from proxy.serving.plan import RequestPlan
from proxy.serving.ratelimit import KeyLimits
from proxy.shared.limits import RateLimiter
from proxy.shared.link import SharedUnavailable
from proxy.serving.record import RequestRecord


class ServingCore:
    def __init__(self, *, gate: Gate, pools: PoolState, cache: AnswerCache, metrics: Metrics,
                 tiers: list[Tier], keys: list[ApiKey], cache_settings: Cache, timeouts: Timeouts,
                 routing: Routing, on_ejection: Callable[[Ejection], None], limiter: RateLimiter) -> None:
        self.gate = gate
        self.limiter = limiter
        self.on_ejection = on_ejection
        self.pools = pools
        self.cache = cache
        self.metrics = metrics
        self.coalescer = Coalescer()
        self.active = 0  # answers open right now (the retry budget scales with them)
        self.budget = RetryBudget(routing.retry_budget_ratio, routing.min_retry_concurrency, lambda: self.active)
        self.key_limits: dict[str, KeyLimits] = {}
        self.degraders: dict[str, Degrader] = {}
        self._cache_writes: set[asyncio.Task] = set()
        self.reconfigure(tiers, keys, cache_settings, timeouts, routing)

    def reconfigure(self, tiers: list[Tier], keys: list[ApiKey], cache_settings: Cache, timeouts: Timeouts,
                    routing: Routing) -> None:
        """Take (re)loaded settings. Requests in flight keep what they started with; a key's rate
        limit state survives a reload that leaves its limits unchanged."""
        self.tiers = {t.name: t for t in tiers}
        self.coalesce = cache_settings.coalesce
        self.keepalive_s = timeouts.keepalive_comment_s
        self.max_attempts = routing.max_attempts
        self.budget.ratio, self.budget.minimum = routing.retry_budget_ratio, routing.min_retry_concurrency
        old_degraders, self.degraders = self.degraders, {}
        for t in tiers:
            if t.fallback is not None:
                f = t.fallback
                settings = (f.queue_depth, f.utilization, f.expected_wait_s, f.recover_ratio)
                kept = old_degraders.get(t.name)
                self.degraders[t.name] = kept if kept is not None and kept.settings == settings else Degrader(*settings)
        old_limits, self.key_limits = self.key_limits, {}
        for k in keys:
            if k.requests_per_second or k.tokens_per_minute:
                kept = old_limits.get(k.name)
                settings = (k.requests_per_second, k.tokens_per_minute, k.requests_burst)
                same = kept is not None and kept.settings == settings
                self.key_limits[k.name] = kept if same else KeyLimits(*settings[:2], time.monotonic, settings[2])

    # --- degradation (a Planner callback: it reads live load) -----------------------------------
    def choose_pool(self, tier: str, pool: str) -> str:
        """The tier's fallback pool while its own pool is saturated (with hysteresis)."""
        tier_cfg = self.tiers[tier]
        degrader = self.degraders.get(tier)
        if degrader is None or pool != tier_cfg.pool:
            return pool
        admission = self.gate.admissions[pool]
        utilization = admission.active / admission.capacity if admission.capacity else 1.0
        if degrader.update(Load(admission.queued(), utilization, self.gate.expected_wait_s(pool))):
            self.metrics.degraded.labels(tier, tier_cfg.fallback.pool).inc()
            return tier_cfg.fallback.pool
        return pool

    def context_length(self, pool: str) -> int | None:
        """A Planner callback: the context length the pool's ready workers report."""
        return self.pools.context_length(pool)

    async def rate_limit(self, key_name: str, tier: str, cost: int = 0) -> Callable[[int], None] | None:
        """Charge the key's buckets (one request, `cost` tokens; shared by every host when Redis
        is configured) or refuse with 429; returns the refund for unused tokens, None when the key
        has no limits."""
        limits = self.key_limits.get(key_name)
        if limits is None:
            return None
        wait, refund = await self.limiter.admit(key_name, limits, cost)
        if wait:
            self.metrics.rate_limited.labels(tier, "key").inc()
            raise Overloaded("Rate limit reached for this API key; retry after the indicated time.",
                             code="rate_limit_exceeded", retry_after=wait)
        return refund

    # --- one request ----------------------------------------------------------------------------
    def answer(self, plan: RequestPlan, rec: RequestRecord) -> "AnswerScope":
        """`async with core.answer(plan, rec) as answer`: admit (or serve from the cache, or join a
        flight) and give the Answer; leaving the block releases everything the request holds and
        cancels its generation if unfinished."""
        return AnswerScope(self, plan, rec)

    async def _direct(self, plan: RequestPlan, gen: Generation, rec: RequestRecord):
        ticket = await self.gate.acquire(plan.pool, plan.tier, plan.key, plan.cost)
        answer = Answer("bypass", gen.frames(), lambda: (served_by_worker(gen.worker), gen.dispatched_at),
                        lambda: ticket.queued_s, rec, generation=gen)
        return answer, lambda: self.gate.release(ticket)

    async def _shared(self, plan: RequestPlan, generation: Callable[[], Generation], rec: RequestRecord):
        key = plan.cache_key
        leading = False  # this host holds the cross-host single-flight lock for `key`
        if plan.cache_read:
            cached = await self.cache.get(key)
            if cached is None:
                joined = self._join_flight(key, plan, rec)
                if joined is not None:
                    return joined
                if plan.cache_write and self.cache.shared is not None:
                    leading, cached = await self._lead_or_follow(key)
                    joined = None if leading or cached is not None else self._join_flight(key, plan, rec)
                    if joined is not None:  # a local request started it while this one waited
                        return joined
            if cached is not None:
                return (Answer.from_cache(cached, rec, same_owner=cached.owner == plan.key,
                                          bodies=self.cache.bodies(key, cached)), lambda: None)

        gen = generation()  # this request starts the flight: its generation serves everyone who joins

        async def run(flight: Flight) -> None:
            try:
                await generate(flight)
            finally:
                if leading and not released:  # failed or cancelled: waiting hosts generate themselves
                    self._store(key, None, release_flight=True)

        async def generate(flight: Flight) -> None:
            nonlocal released
            ticket = await self._admit_flight(flight, plan)
            flight.queued_s = ticket.queued_s
            text: list[str] = []
            try:
                async with contextlib.aclosing(gen.frames()) as frames:
                    async for batch in frames:
                        if batch is None:
                            continue  # each waiter sends its own keepalives
                        flight.worker, flight.dispatched_at = gen.worker, gen.dispatched_at
                        for item in batch:
                            if isinstance(item, Finished):
                                if plan.cache_write:
                                    answer = CachedAnswer(text, item.finish_reason, item.prompt_tokens,
                                                          item.completion_tokens, gen.worker.model, gen.worker.id,
                                                          owner=plan.key)
                                    self._store(key, answer, release_flight=leading)
                                    released = True
                            elif item.text:
                                text.append(item.text)
                        flight.publish(batch)
            finally:
                self.gate.release(ticket)

        released = False  # the single-flight lock's release is scheduled (with the answer's write)

        flight = self.coalescer.start(key, run, tier=plan.tier, owner=plan.key)
        self.coalescer.join(flight)
        return (Answer("miss", flight.follow(self.keepalive_s),
                       lambda: (served_by_worker(flight.worker), flight.dispatched_at), lambda: flight.queued_s, rec),
                lambda: self.coalescer.leave(flight))

    def _join_flight(self, key: str, plan: RequestPlan, rec: RequestRecord):
        """Join this host's identical request in flight, if there is one (and coalescing is on)."""
        flight = self.coalescer.get(key) if self.coalesce else None
        if flight is None:
            return None
        self.coalescer.join(flight)
        self._raise_tier(flight, plan.tier)
        return (Answer("coalesced", flight.follow(self.keepalive_s),
                       lambda: (served_by_worker(flight.worker), flight.dispatched_at), lambda: flight.queued_s, rec,
                       same_owner=flight.owner == plan.key),
                lambda: self.coalescer.leave(flight))

    async def _lead_or_follow(self, key: str) -> tuple[bool, CachedAnswer | None]:
        """Cross-host single flight: (True, None) when this host generates `key` for all hosts;
        (False, answer) when another host generated it meanwhile; (False, None) when generating
        here anyway (the leader gave up, or shared state is down)."""
        shared = self.cache.shared
        try:
            leading, stored = await shared.lead(key)
            if leading:
                return True, None
            if stored is None:
                stored = await shared.wait_for_leader(key)
            self.cache.remember(key, stored)
            return False, self.cache.decode(key, stored)
        except SharedUnavailable:
            return False, None

    def _raise_tier(self, flight: Flight, tier: str) -> None:
        """A shared generation waits at the highest tier among those waiting for it."""
        ranks = list(self.tiers)
        if flight.tier in ranks and tier in ranks and ranks.index(tier) < ranks.index(flight.tier):
            flight.tier = tier
            flight.tier_raised.set()

    async def _admit_flight(self, flight: Flight, plan: RequestPlan):
        """Admission for a shared flight, queued again at once if a higher tier joins meanwhile
        (the leader's queue place is given up; the higher tier's own queue decides)."""
        started = time.monotonic()
        while True:
            flight.tier_raised.clear()
            acquire = asyncio.ensure_future(self.gate.acquire(plan.pool, flight.tier, plan.key, plan.cost))
            raised = asyncio.ensure_future(flight.tier_raised.wait())
            try:
                await asyncio.wait({acquire, raised}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                raised.cancel()
                if not acquire.done():
                    acquire.cancel()  # the gate hands back a slot granted in the same instant
            try:
                ticket = await acquire
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
                continue  # a higher tier joined: queue again at its tier
            ticket.queued_s = time.monotonic() - started
            return ticket

    def _store(self, key: str, answer: CachedAnswer | None, release_flight: bool = False) -> None:
        """Write the answer to the cache in the background; then release the cross-host flight
        lock, so that hosts waiting on it find the answer when the lock is gone."""
        async def write() -> None:
            if answer is not None:
                await self.cache.put(key, answer)
            if release_flight:
                try:
                    await self.cache.shared.release(key)
                except SharedUnavailable:
                    pass  # it expires on its own

        task = asyncio.create_task(write())
        self._cache_writes.add(task)
        task.add_done_callback(self._cache_writes.discard)

    async def aclose(self) -> None:
        """Cancel shared flights nobody can wait for any more and finish pending cache writes."""
        await self.coalescer.close()
        if self._cache_writes:
            await asyncio.gather(*self._cache_writes, return_exceptions=True)


class AnswerScope:
    """One request's hold on the serving core, as an async context manager (a class rather than
    an @asynccontextmanager generator: this runs for every request, a cache hit included, and a
    generator-based manager costs an async generator - registered with the event loop's
    asyncgen hooks on first use - and contextlib's frames on top, a few percent of a hit)."""

    __slots__ = ("core", "plan", "rec", "refund", "gen", "close", "entered")

    def __init__(self, core: ServingCore, plan: RequestPlan, rec: RequestRecord) -> None:
        self.core, self.plan, self.rec = core, plan, rec
        self.refund: Callable[[int], None] | None = None
        self.gen: Generation | None = None  # made only when this request generates (not for a hit or a join)
        self.close: Callable[[], None] | None = None
        self.entered = False

    def _generation(self) -> Generation:
        core, plan = self.core, self.plan
        self.gen = Generation(core.pools, plan.pool, plan.generate, plan.cost, first_token_s=plan.first_token_s,
                              idle_s=plan.idle_s, keepalive_s=core.keepalive_s, budget=core.budget,
                              max_attempts=core.max_attempts, metrics=core.metrics, on_ejection=core.on_ejection)
        return self.gen

    async def __aenter__(self) -> Answer:
        core, plan, rec = self.core, self.plan, self.rec
        self.refund = await core.rate_limit(plan.key, plan.tier, plan.cost)
        core.active += 1
        self.entered = True
        try:
            if plan.cache_key is None:
                answer, self.close = await core._direct(plan, self._generation(), rec)
            else:
                answer, self.close = await core._shared(plan, self._generation, rec)
            rec.cache, rec.cache_header = answer.cache, answer.cache_header
            core.metrics.child(core.metrics.cache_requests, answer.cache).inc()
        except BaseException as exc:
            self._leave(exc)
            raise
        return answer

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        try:
            if self.close is not None:
                self.close()
        finally:
            self._leave(exc)
        return False

    def _leave(self, exc: BaseException | None) -> None:
        """What leaving does once, however the block ends: count a cancellation, release the
        admission count, record failovers, refund unused tokens."""
        if not self.entered:
            return
        self.entered = False
        core, rec, gen = self.core, self.rec, self.gen
        if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
            core.metrics.cancellations.labels("generating" if gen is not None and gen.dispatched_at
                                              else "queued").inc()
        core.active -= 1
        if gen is not None:
            rec.failovers = gen.failovers
        if self.refund is not None:
            self.refund(self.plan.cost - (rec.prompt_tokens + rec.completion_tokens))
