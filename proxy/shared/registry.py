"""The host registry: each appliance publishes who it is and how loaded it is under
`<prefix>:host:<host id>` with an expiry, renewed every third of it, so a host that dies leaves
the registry by itself. `fullpower status --fleet` reads every entry through any host's admin
listener. The registry is for operators (and dashboards); nothing routes by it - nginx (or a
Kubernetes Service) in front decides where requests go."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

from proxy.shared.link import SharedState, SharedUnavailable

log = logging.getLogger("fullpower.shared")
MAX_HOSTS_LISTED = 1000  # a fleet listing reads at most this many entries


class HostRegistry:
    def __init__(self, shared: SharedState, address: str, ttl_s: float, describe: Callable[[], dict]) -> None:
        self.shared = shared
        self.address = address
        self.ttl_s = ttl_s
        self.describe = describe  # () -> {"pools": ..., "load": ...}: read from their owners when published
        self.started_at = time.time()

    def entry(self) -> dict:
        return {"id": self.shared.host_id, "address": self.address, "started_at": self.started_at,
                "published_at": time.time(), **self.describe()}

    async def publish(self) -> None:
        body = json.dumps(self.entry())
        await self.shared.call("registry", lambda redis: redis.set(self.shared.key("host", self.shared.host_id), body,
                                                                    px=int(self.ttl_s * 1000)))

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except SharedUnavailable:
                pass  # counted and logged by the link
            await asyncio.sleep(self.ttl_s / 3)

    async def withdraw(self) -> None:
        """At a clean stop: leave the registry now rather than when the entry expires."""
        try:
            await self.shared.call("registry", lambda redis: redis.delete(self.shared.key("host", self.shared.host_id)))
        except SharedUnavailable:
            pass

    async def hosts(self) -> list[dict]:
        """Every registered host, sorted by id (SharedUnavailable when Redis is down)."""
        pattern = self.shared.key("host", "*")

        async def read(redis):
            keys = []
            async for key in redis.scan_iter(match=pattern, count=200):
                keys.append(key)
                if len(keys) >= MAX_HOSTS_LISTED:
                    break
            return await redis.mget(keys) if keys else []

        entries = []
        for raw in await self.shared.call("registry", read):
            if raw is None:
                continue  # expired between the scan and the read
            try:
                entries.append(json.loads(raw))
            except ValueError:
                continue
        return sorted(entries, key=lambda e: str(e.get("id")))
