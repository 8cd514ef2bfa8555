"""Composition root: builds the components, the public and admin applications, and runs them with a
staged shutdown (stop accepting, drain in-flight work, stop the workers)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
import time

import msgspec
from aiohttp import web

from proxy import systemd
from proxy.http.openai import OpenAIApi
from proxy.config import Config, ConfigError, load_config, parse_host_port
from proxy.errors import ApiError, MethodNotAllowed, NoWorkerReady, NotFound, PayloadTooLarge
from proxy.serving.gate import Gate
from proxy.serving.generation import RetryBudget
from proxy.serving.cache import AnswerCache
from proxy.jobs.service import Jobs
from proxy.metrics import Metrics, cache_collector, jobs_collector, pool_collector
from proxy.serving.record import RequestRecord, new_request_id
from proxy.fleet.pool import PoolState
from proxy.fleet.supervisor import Supervisor

log = logging.getLogger("fullpower")
_json = msgspec.json.Encoder()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _error_response(exc: ApiError, request_id: str) -> web.Response:
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json",
                        headers={**exc.headers(), "X-Request-Id": request_id})


def _as_api_error(exc: web.HTTPException, request: web.Request) -> ApiError | None:
    if exc.status == 404:
        return NotFound(f"Unknown path {request.path}.")
    if exc.status == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    return None


class ClientAddress:
    """The client's address: the peer, or - when the peer is a trusted proxy - the nearest address in
    X-Forwarded-For that is not itself a trusted proxy."""

    def __init__(self, trusted: list[str]) -> None:
        self.trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, request: web.Request) -> str:
        peer = request.remote or ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer


class Appliance:
    """Owns every long-lived component; `start` and `stop` are the only lifecycle entry points."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = Metrics()
        self.pools = PoolState(slow_start_s=cfg.routing.slow_start_s,
                               restart_after_ejections=cfg.outlier.restart_after_ejections)
        self.supervisor = Supervisor(cfg, self.pools, self.metrics)
        self.gate = Gate(cfg, self.pools)
        self.supervisor.queue_depth = self.gate.queue_depth
        self._reload_lock = asyncio.Lock()
        self.inflight = 0
        budget = RetryBudget(cfg.routing.retry_budget_ratio, cfg.routing.min_retry_concurrency, lambda: self.inflight)
        c = cfg.cache
        self.cache = AnswerCache(c.memory_bytes, c.disk_bytes, cfg.cache_dir(), c.ttl_s, self.metrics)
        self.api = OpenAIApi(cfg, self.pools, self.gate, self.metrics, budget, self.cache)
        self.metrics.add_collector(cache_collector(self.cache))
        self.jobs = Jobs(cfg, self.api, self.metrics) if cfg.jobs.enabled else None
        if self.jobs is not None:
            self.metrics.add_collector(jobs_collector(self.jobs))
        self.metrics.add_collector(pool_collector(self.pools, self.gate))
        self.client_address = ClientAddress(cfg.limits.trusted_proxies)
        self.draining = False
        self._runners: list[web.AppRunner] = []

    # --- applications ---------------------------------------------------------------------------
    def public_app(self) -> web.Application:
        app = web.Application(middlewares=[self._request_context], client_max_size=self.cfg.limits.max_body_bytes)
        app.add_routes(self.api.routes())
        if self.jobs is not None:
            app.add_routes(self.jobs.routes())
        app.add_routes([web.get("/healthz", self.healthz), web.get("/readyz", self.readyz)])
        return app

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[self._request_context])
        app.add_routes([web.get("/admin/pool", self.admin_pool), web.get("/metrics", self.metrics_endpoint),
                        web.get("/healthz", self.healthz), web.get("/readyz", self.readyz),
                        web.post("/admin/reload", self.admin_reload),
                        web.post("/admin/cache/clear", self.admin_cache_clear),
                        web.get("/admin/cache", self.admin_cache_stats),
                        web.post("/admin/workers/{id}/{action:drain|undrain|restart|kill}", self.admin_worker),
                        web.post("/admin/pools/{pool}/restart", self.admin_rolling_restart)])
        if self.jobs is not None:
            app.add_routes(self.jobs.admin_routes())
        return app

    @web.middleware
    async def _request_context(self, request: web.Request, handler):
        """Request id in and out, one record per request (access log + metrics), and every error as
        an OpenAI-shaped body (never a traceback)."""
        incoming = request.headers.get("X-Request-Id", "")
        rec = RequestRecord(incoming if _REQUEST_ID.match(incoming) else new_request_id(),
                            self.client_address.of(request), request.method, request.path)
        request["record"] = rec
        # Only API requests are in-flight work: the drain waits for them and the retry budget scales
        # with them; a metrics scrape or an admin rolling restart is neither.
        api = request.path.startswith("/v1/")
        self.inflight += api
        try:
            if self.draining and api:
                raise NoWorkerReady("The server is shutting down.", retry_after=1.0)
            response = await handler(request)
            if not response.prepared:
                response.headers.setdefault("X-Request-Id", rec.id)
            return response
        except ApiError as exc:
            rec.fail(exc)
            response = _error_response(exc, rec.id)
            if rec.cache:
                response.headers["X-Fullpower-Cache"] = rec.cache
            return response
        except web.HTTPException as exc:
            api_error = _as_api_error(exc, request)
            if api_error is None:
                raise
            rec.fail(api_error)
            return _error_response(api_error, rec.id)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            rec.fail(exc)
            raise
        except Exception:
            log.exception("unhandled error in request %s", rec.id)
            error = ApiError(f"Internal error; request id {rec.id}.")
            rec.fail(error)
            return _error_response(error, rec.id)
        finally:
            self.inflight -= api
            rec.finish(self.metrics)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.pools.any_ready() and not self.draining
        return web.json_response({"ready": ready, "draining": self.draining}, status=200 if ready else 503)

    async def admin_pool(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        workers = [w.snapshot(now) for w in self.pools.workers.values()]
        queues = {pool: {tier: {"queued": a.queued(tier), "active": a.active_in(tier)} for tier in a.tiers}
                  for pool, a in self.gate.admissions.items()}
        return web.Response(body=_json.encode({"workers": workers, "queues": queues, "draining": self.draining}),
                            content_type="application/json")

    async def admin_worker(self, request: web.Request) -> web.Response:
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
        return web.json_response({"worker": worker_id, "action": action, "state": self.pools.workers[worker_id].state})

    async def admin_rolling_restart(self, request: web.Request) -> web.Response:
        pool = request.match_info["pool"]
        if not self.supervisor.running(pool):
            raise NotFound(f"no running workers in pool {pool!r}")
        try:
            restarted = await self.supervisor.rolling_restart(pool)
        except TimeoutError as exc:
            raise ApiError(str(exc)) from None
        return web.json_response({"pool": pool, "restarted": restarted})

    async def admin_cache_clear(self, request: web.Request) -> web.Response:
        return web.json_response({"cleared": await self.cache.clear()})

    async def admin_cache_stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cache.stats())

    async def admin_reload(self, request: web.Request) -> web.Response:
        ok, lines = await self.reload()
        return web.json_response({"ok": ok, "changes" if ok else "problems": lines}, status=200 if ok else 400)

    async def reload(self) -> tuple[bool, list[str]]:
        """Read and validate the config file again; apply it if valid, else keep the running one."""
        if not self.config_path:
            return False, ["(file): this server was not started from a config file"]
        try:
            new = load_config(self.config_path)
            problems = [f"{field}: changing it needs a restart" for field in ("listen", "admin_listen", "data_dir")
                        if getattr(new, field) != getattr(self.cfg, field)]
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("invalid").inc()
            log.error("reload refused, still running the previous config: %s", "; ".join(exc.problems))
            return False, exc.problems
        async with self._reload_lock:
            self.cfg = new
            self.gate.update(new)
            self.api.update(new)
            if self.jobs is not None:
                self.jobs.update(new)
            changes = await self.supervisor.apply(new)
        self.metrics.config_reloads.labels("applied").inc()
        log.info("config reloaded: %s", "; ".join(changes) or "no worker changes")
        return True, changes

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    def status_line(self) -> str:
        workers = list(self.pools.workers.values())
        ready = sum(1 for w in workers if w.state.value == "ready")
        queued = sum(a.queued() for a in self.gate.admissions.values())
        return f"{ready}/{len(workers)} workers ready, {self.inflight} requests in flight, {queued} queued"

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.supervisor.start()
        if self.jobs is not None:
            await self.jobs.start()
        limits = self.cfg.limits
        for app, address in ((self.public_app(), self.cfg.listen), (self.admin_app(), self.cfg.admin_listen)):
            # keepalive_timeout runs from the connection's start (and from each response): a client
            # that has not sent a whole request head by then is closed, so it doubles as the
            # slow-header timeout.
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                   keepalive_timeout=limits.header_timeout_s, max_headers=limits.max_header_count,
                                   max_field_size=limits.max_header_bytes, max_line_size=limits.max_header_bytes)
            await runner.setup()
            host, port = parse_host_port(address)
            await web.TCPSite(runner, host, port, backlog=4096).start()
            self._runners.append(runner)
            log.info("listening on http://%s", address)

    async def stop(self) -> None:
        """Staged: readiness fails, new requests are refused, in-flight ones get the drain period,
        then the listeners close and the workers stop (SIGTERM, then SIGKILL)."""
        self.draining = True
        systemd.notify("STOPPING=1")
        deadline = time.monotonic() + self.cfg.timeouts.drain_s
        if self.inflight:
            log.info("draining %d in-flight requests (up to %.0fs)", self.inflight, self.cfg.timeouts.drain_s)
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("drain period over; cancelling %d requests", self.inflight)
        if self.jobs is not None:
            await self.jobs.stop()  # running jobs go back to the queue at the next start
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.api.coalescer.close()
        await self.supervisor.stop()
        self.cache.close()
        log.info("stopped")


async def serve(cfg: Config, config_path: str | None = None) -> None:
    appliance = Appliance(cfg, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Signal handlers only queue work for the loop (gunicorn's rule).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        task = loop.create_task(appliance.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await appliance.start()
    watchdog = asyncio.create_task(systemd.watchdog_loop(appliance.status_line))
    systemd.notify("READY=1")
    try:
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        watchdog.cancel()
        for task in reloads:
            task.cancel()
        await appliance.stop()
