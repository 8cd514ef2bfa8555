"""The answer cache's shared tier and cross-host single flight, on Redis.

Entries are the same encoded bytes as the host's own tiers (serving/cache.py owns the format),
under `<prefix>:cache:<cache key>` with the cache's TTL; the cache key already carries the scope
(per API key by default), so sharing across hosts shares nothing across keys that one host would
not. Redis bounds the tier's size with its own eviction (maxmemory with an LRU policy: README);
answers larger than `shared.cache_max_entry_bytes` stay on their host.

Single flight: the first host to generate a cacheable answer takes a short lock
(`<prefix>:flight:<cache key>`, SET NX with an expiry, its value this host's id); another host
asking the same meanwhile waits for the answer to appear in the shared tier, and generates it
itself when the lock goes away without an answer (the leader failed or the answer was not
storable) or when waiting runs past the lock's expiry. Looking for the answer and taking the
lock are one script: the leader stores its answer before it releases the lock, so a host that
finds the lock free has also looked at the entry after the leader stored it (two separate calls
would let a host miss the entry, then find the lock just released, and generate again).
"""

from __future__ import annotations

import asyncio
import time

from proxy.shared.link import SharedState

POLL_S = 0.02  # a follower looks for the leader's answer this often
# Delete the lock only if this host still holds it (it may have expired and been taken since).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The stored answer if there is one ({1, answer}); else take the lock ({0}) or report it held ({2}).
LEAD = """
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
return {2}
"""


class SharedCache:
    def __init__(self, shared: SharedState, ttl_s: float) -> None:
        self.shared = shared
        self.ttl_s = ttl_s
        self.max_entry_bytes = shared.settings.cache_max_entry_bytes
        self.lock_ms = int(shared.settings.single_flight_s * 1000)
        self._release = shared.redis.register_script(RELEASE)
        self._lead = shared.redis.register_script(LEAD)

    async def get(self, key: str) -> bytes | None:
        """SharedUnavailable when Redis is down."""
        return await self.shared.call("cache_get", lambda redis: redis.get(self.shared.key("cache", key)))

    async def put(self, key: str, raw: bytes) -> None:
        if len(raw) > self.max_entry_bytes:
            return
        await self.shared.call("cache_put", lambda redis: redis.set(self.shared.key("cache", key), raw,
                                                                     px=int(self.ttl_s * 1000)))

    async def clear(self) -> int:
        """Delete every shared entry (an operator's `cache clear` on any host clears it for all)."""
        async def delete_all(redis) -> int:
            removed, batch = 0, []
            async for key in redis.scan_iter(match=self.shared.key("cache", "*"), count=500):
                batch.append(key)
                if len(batch) >= 500:
                    removed += await redis.delete(*batch)
                    batch.clear()
            if batch:
                removed += await redis.delete(*batch)
            return removed

        return await self.shared.call("cache_clear", delete_all)

    async def lead(self, key: str) -> tuple[bool, bytes | None]:
        """(False, answer) when the answer is stored already; (True, None) when this host now
        generates `key` for every host (it holds the lock); (False, None) when another host holds it."""
        reply = await self.shared.call("flight_lock", lambda redis: self._lead(
            keys=[self.shared.key("cache", key), self.shared.key("flight", key)],
            args=[self.shared.host_id, self.lock_ms]))
        if reply[0] == 1:
            return False, reply[1]
        return reply[0] == 0, None

    async def release(self, key: str) -> None:
        await self.shared.call("flight_release", lambda redis: self._release(
            keys=[self.shared.key("flight", key)], args=[self.shared.host_id]))

    async def wait_for_leader(self, key: str) -> bytes | None:
        """The leader's answer once it is stored, or None when the lock is gone without one (or
        waiting ran past the lock's expiry): then the caller generates it itself."""
        cache_key, lock_key = self.shared.key("cache", key), self.shared.key("flight", key)
        deadline = time.monotonic() + self.lock_ms / 1000

        async def look(redis):
            async with redis.pipeline(transaction=False) as pipe:
                return await pipe.get(cache_key).exists(lock_key).execute()

        while time.monotonic() < deadline:
            raw, locked = await self.shared.call("flight_wait", look)
            if raw is not None:
                return raw
            if not locked:
                return None
            await asyncio.sleep(POLL_S)
        return None
