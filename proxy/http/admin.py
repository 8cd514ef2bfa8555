"""The admin listener's endpoints: pool and queue state, metrics, probes, reload, cache and worker
operations. Each handler is a thin call into the component that owns the state."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

import msgspec
from aiohttp import web

from proxy.errors import ApiError, NotFound
from proxy.fleet.pool import PoolState
from proxy.fleet.supervisor import Supervisor
from proxy.http.server import InflightRequests
from proxy.metrics import Metrics
from proxy.serving.cache import AnswerCache
from proxy.serving.gate import Gate
from proxy.shared.link import SharedUnavailable
from proxy.shared.registry import HostRegistry

_json = msgspec.json.Encoder()


class SharedStateDown(ApiError):
    status = 503
    type = "server_error"
    code = "shared_state_unavailable"


class Probes:
    """/healthz and /readyz, on both listeners; /health is /readyz under the path vLLM and TGI
    answer (benchmark clients such as guidellm check it before they start)."""

    def __init__(self, pools: PoolState, inflight: InflightRequests) -> None:
        self.pools = pools
        self.inflight = inflight

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/healthz", self.healthz), web.get("/readyz", self.readyz), web.get("/health", self.readyz)]

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        draining = self.inflight.draining
        ready = self.pools.any_ready() and not draining
        return web.json_response({"ready": ready, "draining": draining}, status=200 if ready else 503)


class AdminHandlers:
    def __init__(self, pools: PoolState, gate: Gate, supervisor: Supervisor, cache: AnswerCache, metrics: Metrics,
                 inflight: InflightRequests, reload: Callable[[], Awaitable[tuple[bool, list[str]]]],
                 registry: HostRegistry | None = None) -> None:
        self.registry = registry  # other appliances sharing state with this one (None: on its own)
        self.pools = pools
        self.gate = gate
        self.supervisor = supervisor
        self.cache = cache
        self.metrics = metrics
        self.inflight = inflight
        self.reload = reload

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/pool", self.pool), web.get("/metrics", self.metrics_endpoint),
                web.get("/admin/fleet", self.fleet),
                web.post("/admin/reload", self.admin_reload),
                web.post("/admin/cache/clear", self.cache_clear), web.get("/admin/cache", self.cache_stats),
                web.post("/admin/workers/{id}/{action:drain|undrain|restart|kill}", self.worker_action),
                web.post("/admin/pools/{pool}/restart", self.rolling_restart)]

    async def pool(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        workers = [w.snapshot(now) for w in self.pools.workers.values()]
        queues = {pool: {tier: {"queued": a.queued(tier), "active": a.active_in(tier)} for tier in a.tiers}
                  for pool, a in self.gate.admissions.items()}
        return web.Response(body=_json.encode({"workers": workers, "queues": queues,
                                               "draining": self.inflight.draining}),
                            content_type="application/json")

    async def fleet(self, request: web.Request) -> web.Response:
        """Every appliance in the host registry (shared state), this one included."""
        if self.registry is None:
            raise NotFound("This appliance shares no state with others (shared.redis_url is not set): no fleet.",
                           code="no_fleet")
        try:
            hosts = await self.registry.hosts()
        except SharedUnavailable as exc:
            raise SharedStateDown(f"Shared state (Redis) unreachable: {exc}", retry_after=5) from None
        return web.Response(body=_json.encode({"self": self.registry.shared.host_id, "hosts": hosts}),
                            content_type="application/json")

    async def worker_action(self, request: web.Request) -> web.Response:
        worker_id, action = request.match_info["id"], request.match_info["action"]
        try:
            if action == "drain":
                self.supervisor.drain(worker_id)
            elif action == "undrain":
                self.supervisor.undrain(worker_id)
            elif action == "kill":
                self.supervisor.kill(worker_id)
            else:
                await self.supervisor.restart_worker(worker_id)
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        except TimeoutError as exc:
            raise ApiError(str(exc)) from None
        return web.json_response({"worker": worker_id, "action": action,
                                  "state": self.pools.workers[worker_id].state})

    async def rolling_restart(self, request: web.Request) -> web.Response:
        pool = request.match_info["pool"]
        if not self.supervisor.running(pool):
            raise NotFound(f"no running workers in pool {pool!r}")
        try:
            restarted = await self.supervisor.rolling_restart(pool)
        except TimeoutError as exc:
            raise ApiError(str(exc)) from None
        return web.json_response({"pool": pool, "restarted": restarted})

    async def cache_clear(self, request: web.Request) -> web.Response:
        return web.json_response({"cleared": await self.cache.clear()})

    async def cache_stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cache.stats())

    async def admin_reload(self, request: web.Request) -> web.Response:
        ok, lines = await self.reload()
        return web.json_response({"ok": ok, "changes" if ok else "problems": lines}, status=200 if ok else 400)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})
