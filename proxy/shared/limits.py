"""Per-key rate limits enforced across appliances: the same token buckets as serving/ratelimit.py
(requests per second, tokens per minute, a request bigger than the bucket passes when it is full),
kept in Redis and checked by one Lua script per request, so that checking both buckets and
charging them is atomic across hosts. The script reads Redis's own clock: hosts need not agree
on time. When Redis is unreachable the key's host-local buckets decide instead (each host then
admits up to the key's full rate: documented in the README)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from proxy.shared.link import SharedState, SharedUnavailable

log = logging.getLogger("fullpower.shared")
MAX_PENDING_REFUNDS = 1024  # refunds in flight to Redis; beyond this one is skipped (over-charging is safe)

# KEYS: requests bucket, tokens bucket. ARGV: requests rate/s, requests burst, tokens rate/s,
# tokens burst, cost (tokens). A rate of 0 means "no such bucket". Returns "0" when admitted
# (both charged), else the seconds until it would fit (nothing charged), as a string: Lua numbers
# become integers on the way out.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, rate, burst)
  local v = redis.call('HMGET', key, 'l', 's')
  local l, s = tonumber(v[1]), tonumber(v[2])
  if l == nil then return burst end
  return math.min(burst, l + (now - s) * rate)
end
local function fits(l, amount, burst) return l >= amount or l >= burst end
local rr, rb, tr, tb, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rl, tl
if rr > 0 then
  rl = level(KEYS[1], rr, rb)
  if not fits(rl, 1, rb) then return tostring((1 - rl) / rr) end
end
if tr > 0 then
  tl = level(KEYS[2], tr, tb)
  if not fits(tl, cost, tb) then return tostring((math.min(cost, tb) - tl) / tr) end
end
if rr > 0 then
  redis.call('HSET', KEYS[1], 'l', rl - 1, 's', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(rb / rr * 1000) + 60000)
end
if tr > 0 then
  redis.call('HSET', KEYS[2], 'l', tl - cost, 's', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil(tb / tr * 1000) + 60000)
end
return '0'
"""

# KEYS: tokens bucket. ARGV: rate/s, burst, tokens to give back.
REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'l', 's')
local l, s = tonumber(v[1]), tonumber(v[2])
if l == nil then return 0 end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
l = math.min(burst, l + (now - s) * rate + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'l', l, 's', now)
return 1
"""


class RateLimiter:
    """`limits` is the key's serving.ratelimit.KeyLimits (its rates and bursts; its host-local
    buckets are the fallback). Charges a key's limits: in Redis while shared state is usable, else the host-local
    KeyLimits. Returns a refund function for the tokens a request did not use."""

    def __init__(self, shared: SharedState | None) -> None:
        self.shared = shared
        self._admit = shared.redis.register_script(ADMIT) if shared else None
        self._refund = shared.redis.register_script(REFUND) if shared else None
        self._refunds: set[asyncio.Task] = set()

    async def admit(self, key_name: str, limits, cost: int) -> tuple[float, Callable[[int], None]]:
        """(0, refund) when admitted and charged, else (seconds to wait, a no-op)."""
        if self.shared is not None:
            try:
                wait = await self._shared_admit(key_name, limits, cost)
            except SharedUnavailable:
                pass
            else:
                return wait, (lambda unused: self._shared_refund(key_name, limits, unused))
        return limits.admit(cost), limits.refund

    async def _shared_admit(self, key_name: str, limits, cost: int) -> float:
        shared = self.shared
        r, t = limits.requests, limits.tokens
        keys = [shared.key("limit", key_name, "requests"), shared.key("limit", key_name, "tokens")]
        args = [r.rate if r else 0, r.burst if r else 0, t.rate if t else 0, t.burst if t else 0, cost]
        return float(await shared.call("rate_limit", lambda redis: self._admit(keys=keys, args=args)))

    def _shared_refund(self, key_name: str, limits, unused: int) -> None:
        t = limits.tokens
        if t is None or unused <= 0 or len(self._refunds) >= MAX_PENDING_REFUNDS:
            return
        key = self.shared.key("limit", key_name, "tokens")

        async def refund() -> None:
            try:
                await self.shared.call("rate_refund", lambda redis: self._refund(keys=[key], args=[t.rate, t.burst,
                                                                                                 unused]))
            except SharedUnavailable:
                pass  # the tokens stay charged: stricter, never looser

        task = asyncio.create_task(refund())
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)
