"""The one connection to Redis for state shared by several appliances, and its fallback rule.

Every shared operation goes through `SharedState.call`: it times the call (a histogram per
operation), and when Redis does not answer within `shared.timeout_s` - or errs - it marks shared
state down for `shared.retry_s`, counts a fallback and raises SharedUnavailable, so the caller uses
its host-local path (local limits, local cache, no cross-host single flight). While down, calls do
not even try (no request waits on a dead Redis); after retry_s one call tries again, and the first
success says so in the log. One line is logged per change of state, not per request.

redis-py's asyncio client (the maintained client, with its own connection pool and Lua script
loading) rather than a protocol of our own.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.config import Shared
from proxy.metrics import Metrics

log = logging.getLogger("fullpower.shared")


class SharedUnavailable(Exception):
    """Redis is down or slow: use the host-local path."""


class SharedState:
    def __init__(self, settings: Shared, host_id: str, metrics: Metrics) -> None:
        import redis.asyncio

        self.settings = settings
        self.host_id = host_id
        self.prefix = settings.key_prefix + ":"
        self.metrics = metrics
        self.redis = redis.asyncio.Redis.from_url(
            settings.redis_url, socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s,
            retry_on_timeout=False, health_check_interval=0, max_connections=256)
        self.up = True
        self._down_until = 0.0
        self._errors = (OSError, asyncio.TimeoutError, redis.RedisError)
        metrics.shared_up.set(1)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def usable(self) -> bool:
        """False while a recent failure keeps shared state off (the local path is used)."""
        return self.up or time.monotonic() >= self._down_until

    async def call(self, op: str, fn):
        """Run `fn(redis)` (a coroutine function) as operation `op`; SharedUnavailable on failure."""
        if not self.usable:
            self.metrics.child(self.metrics.shared_fallbacks, op).inc()
            raise SharedUnavailable("shared state is down")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_s * 2):
                result = await fn(self.redis)
        except self._errors as exc:
            self._failed(op, exc)
            raise SharedUnavailable(str(exc)) from None
        self.metrics.child(self.metrics.shared_seconds, op).observe(time.perf_counter() - started)
        if not self.up:
            self.up = True
            self.metrics.shared_up.set(1)
            log.warning("shared state (Redis) reachable again: shared limits and cache resume")
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        self.metrics.child(self.metrics.shared_fallbacks, op).inc()
        self._down_until = time.monotonic() + self.settings.retry_s
        if self.up:
            self.up = False
            self.metrics.shared_up.set(0)
            log.error("shared state (Redis) unreachable (%s: %s): local limits and cache on this host, trying "
                      "again every %gs", type(exc).__name__, exc or "timeout", self.settings.retry_s)

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self.redis.aclose(), 2.0)
        except Exception:  # noqa: BLE001 - closing at stop
            pass
