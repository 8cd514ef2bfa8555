"""Composition root: builds every component with the config sections it owns, wires them by
passing collaborators at construction, and runs them. Start and stop go through one
AsyncExitStack: a failure at any step unwinds what already started, in reverse, and a normal stop
unwinds the same way (drain, listeners, jobs, serving core, workers, cache)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import msgspec
from aiohttp import web

from backend.heap import settle_the_heap
from proxy import systemd
from proxy.collectors import cache_collector, jobs_collector, pool_collector
from proxy.config import Config, ConfigError, load_config, parse_host_port
from proxy.fleet.pool import PoolState
from proxy.fleet.supervisor import Supervisor
from proxy.http.admin import AdminHandlers, Probes
from proxy.http.admin_guard import AdminGuard, load_or_create_token, warn_if_exposed
from proxy.http.compat import CompatHandlers
from proxy.http.jobs import JobHandlers
from proxy.http.openai import OpenAIHandlers
from proxy.http.responses import ResponsesHandlers
from proxy.http.server import (ClientAddress, InflightRequests, JsonBodyReader, Listener, RequestContext,
                               set_server_header)
from proxy.jobs.service import JobService
from proxy.metrics import Metrics
from proxy.serving.auth import Authenticator
from proxy.serving.cache import AnswerCache
from proxy.serving.core import ServingCore
from proxy.serving.gate import Gate
from proxy.serving.plan import Planner
from proxy.serving.responses_api import ResponseStore
from proxy.shared.cache import SharedCache
from proxy.shared.limits import RateLimiter
from proxy.shared.link import SharedState
from proxy.shared.registry import HostRegistry

# How long a passed public socket waits for ready workers before accepting anyway (connections
# queue in the socket meanwhile; a cold 70B model may take minutes to load).
PASSED_SOCKET_WAIT_S = 600.0
HANDOVER_GRACE_S = 0.5  # at stop, for requests on connections accepted just before the handover

log = logging.getLogger("fullpower")
# The systemd unit's TimeoutStopSec (systemd/fullpower.service): a stop must end well inside it.
SYSTEMD_STOP_BUDGET_S = 90.0


class StartupError(Exception):
    """The appliance could not start (a listener could not bind): one line for the operator."""


class Appliance:
    """Owns every long-lived component; `start` (into an exit stack) is the only lifecycle entry."""

    def __init__(self, cfg: Config, config_path: str | None = None, listen_override: str | None = None) -> None:
        # `serve --listen` wins over the file's listen, at start and at every reload.
        self.listen_override = listen_override
        cfg = self._with_overrides(cfg)
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = metrics = Metrics()
        self.gate = Gate(cfg.tiers, [p.name for p in cfg.pools])
        self.pools = PoolState(slow_start_s=cfg.routing.slow_start_s,
                               restart_after_ejections=cfg.outlier.restart_after_ejections,
                               on_capacity=self.gate.set_capacity)
        self.supervisor = Supervisor(self.pools, cfg.pools, cfg.workers, cfg.outlier, cfg.timeouts.drain_s,
                                     cfg.resolved_data_dir(), self.gate.queue_depth, metrics)
        c = cfg.cache
        self.cache = AnswerCache(c.memory_bytes, c.disk_bytes, cfg.cache_dir(), c.ttl_s, metrics)
        # State shared with other appliances (Redis): limits, the cache's shared tier, single
        # flight, the host registry. None: this host is on its own.
        self.shared = SharedState(cfg.shared, cfg.host_id(), metrics) if cfg.shared.redis_url else None
        self.registry = None
        if self.shared is not None:
            self.cache.shared = SharedCache(self.shared, c.ttl_s)
            self.registry = HostRegistry(self.shared, cfg.advertised_address(),
                                         cfg.shared.registry_ttl_s, self._describe)
        self.auth = Authenticator(cfg.auth)
        self.planner = Planner(cfg.tiers, cfg.pools, cfg.cache, cfg.timeouts, cfg.limits.max_tokens_default)
        self.core = ServingCore(gate=self.gate, pools=self.pools, cache=self.cache, metrics=metrics, tiers=cfg.tiers,
                                keys=cfg.auth.keys, cache_settings=cfg.cache, timeouts=cfg.timeouts,
                                routing=cfg.routing, on_ejection=self.supervisor.handle_ejection,
                                limiter=RateLimiter(self.shared))
        own_listeners = [parse_host_port(a) for a in (cfg.listen, cfg.admin_listen) if a]
        self.jobs = (JobService(cfg.jobs, cfg.jobs_db(), cfg.jobs_tier(), cfg.auth.keys, own_listeners, self.auth,
                                self.planner, self.core, metrics, cfg.host_id()) if cfg.jobs.enabled else None)
        self.inflight = InflightRequests()
        self.body = JsonBodyReader(cfg.limits)
        self.context = RequestContext(ClientAddress(cfg.limits.trusted_proxies), self.inflight, metrics)
        self.probes = Probes(self.pools, self.inflight)
        self.responses = ResponseStore()  # stored Responses API objects (memory only, bounded)
        self.openai = OpenAIHandlers(self.auth, self.planner, self.core, metrics, self.body)
        self.responses_api = ResponsesHandlers(self.auth, self.planner, self.core, self.body, self.responses)
        self.compat = CompatHandlers(self.auth, self.planner, self.core, self.pools, self.body)
        self.job_handlers = JobHandlers(self.jobs, self.auth, self.body) if self.jobs is not None else None
        self.admin = AdminHandlers(self.pools, self.gate, self.supervisor, self.cache, metrics, self.inflight,
                                   self.reload, self.registry)
        metrics.add_collector(cache_collector(self.cache))
        metrics.add_collector(pool_collector(self.pools, self.gate))
        if self.jobs is not None:
            metrics.add_collector(jobs_collector(self.jobs))
        self._reload_lock = asyncio.Lock()
        self._drain_deadline = 0.0
        self._passed_sites: list[web.BaseSite] = []  # listeners on sockets passed by socket activation
        self._accept_task: asyncio.Task | None = None  # starts the passed public socket once workers are ready

    # --- applications ---------------------------------------------------------------------------
    def public_app(self) -> web.Application:
        app = web.Application(middlewares=[self.context.middleware], client_max_size=self.cfg.limits.max_body_bytes)
        app.on_response_prepare.append(set_server_header)
        app.add_routes(self.openai.routes() + self.responses_api.routes() + self.compat.routes() + self.probes.routes())
        if self.job_handlers is not None:
            app.add_routes(self.job_handlers.routes())
        return app

    def admin_app(self) -> web.Application:
        # The request context first: refusals by the guard are recorded and shaped like any error.
        app = web.Application(middlewares=[self.context.middleware, self.admin_guard.middleware])
        app.on_response_prepare.append(set_server_header)
        app.add_routes(self.admin.routes() + self.probes.routes())
        if self.job_handlers is not None:
            app.add_routes(self.job_handlers.admin_routes())
        return app

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start everything; each step registers its own undo on `stack` (run in reverse)."""
        stack.callback(self.cache.close)
        if self.shared is not None:
            stack.push_async_callback(self.shared.aclose)
            stack.push_async_callback(self._stop_registry, asyncio.create_task(self.registry.run(), name="registry"))
        self.supervisor.start()
        stack.push_async_callback(self.supervisor.stop)
        stack.push_async_callback(self.core.aclose)
        if self.jobs is not None:
            await self.jobs.start()
            stack.push_async_callback(self.jobs.stop)  # running jobs go back to the queue
        try:
            self.admin_guard = AdminGuard(load_or_create_token(self.cfg.admin_token_path()))
        except (OSError, ValueError) as exc:
            raise StartupError(f"admin token: {exc}") from None
        warn_if_exposed(self.cfg.admin_listen)
        listeners = [(self.admin_app(), self.cfg.admin_listen, "admin")]
        if self.cfg.listen:
            listeners.insert(0, (self.public_app(), self.cfg.listen, "public"))
        else:
            log.warning("listen is empty: no public listener (jobs and the admin listener only)")
        # Socket activation: a listening socket systemd (or a harness) holds across our restarts,
        # so connections made while we restart wait in its queue instead of being refused.
        passed = systemd.inherited_sockets()
        for app, address, role in listeners:
            listener = (Listener(app, self.cfg.limits, self.openai.fast_routes(), self.context, self.body)
                        if role == "public" and self.cfg.fast_lane else Listener(app, self.cfg.limits))
            await listener.setup()
            stack.push_async_callback(self._close_listener, listener)
            sock = passed.pop(role, None)
            if sock is not None:
                site = web.SockSite(listener, sock)
                if role == "public":
                    # Accept once the workers can serve: until then connections wait in the
                    # socket's queue (held by the service manager) rather than get 503s.
                    self._accept_task = asyncio.create_task(self._accept_when_ready(site, sock))
                    stack.push_async_callback(self._stop_accept_task)
                else:
                    await self._start_passed_site(site, sock, role)
                continue
            host, port = parse_host_port(address)
            try:
                await web.TCPSite(listener, host, port, backlog=4096).start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
            log.info("listening on http://%s", address)
        for name, sock in passed.items():
            log.warning("a passed socket named %r matches no listener (expected public or admin); closing it", name)
            sock.close()
        stack.push_async_callback(self._drain)  # first to run at stop

    async def _stop_registry(self, task: asyncio.Task) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self.registry.withdraw()

    def _describe(self) -> dict:
        """This host's entry in the fleet registry: its pools and load, read from their owners."""
        pools = {}
        for p in self.cfg.pools:
            workers = [w for w in self.pools.workers.values() if w.pool == p.name]
            pools[p.name] = {"model": p.model, "workers": len(workers), "ready": len(self.pools.ready(p.name))}
        queued = sum(a.queued() for a in self.gate.admissions.values())
        return {"pools": pools, "load": {"inflight": self.inflight.count, "queued": queued},
                "draining": self.inflight.draining}

    async def _start_passed_site(self, site: web.SockSite, sock, role: str) -> None:
        await site.start()
        self._passed_sites.append(site)
        host, port = sock.getsockname()[:2]
        log.info("listening on http://%s:%s (socket passed by the service manager, for %s)", host, port, role)

    async def _accept_when_ready(self, site: web.SockSite, sock) -> None:
        hot = [p.name for p in self.cfg.pools if p.replicas.hot]
        ready = await self.pools.wait_for(lambda: all(self.pools.ready(p) for p in hot), PASSED_SOCKET_WAIT_S)
        if not ready:
            log.warning("workers not ready after %.0fs: accepting on the passed socket anyway", PASSED_SOCKET_WAIT_S)
        await self._start_passed_site(site, sock, "public")

    async def _stop_accept_task(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)

    async def _drain(self) -> None:
        """Readiness fails, new API requests are refused, in-flight ones get the drain period.
        A socket the service manager passed stops being accepted from at once: it stays open
        there, so new connections wait in its queue for the next process; requests on connections
        already accepted are then served (and their connections closed) rather than refused."""
        await self._stop_accept_task()
        handing_over = bool(self._passed_sites)
        if handing_over:
            self.inflight.handover = True
        for site in self._passed_sites:
            await site.stop()
        self._passed_sites.clear()
        self.inflight.draining = True
        if handing_over:
            # A connection accepted just before the stop may not have sent its request yet: give it
            # a moment to arrive (it is then served) before an empty drain closes the connections.
            await asyncio.sleep(HANDOVER_GRACE_S)
        systemd.notify("STOPPING=1")
        drain_s = self.cfg.timeouts.drain_s
        self._drain_deadline = time.monotonic() + drain_s
        if self.inflight.count:
            log.info("draining %d in-flight requests (up to %.0fs)", self.inflight.count, drain_s)
        if not await self.inflight.drained(drain_s):
            log.warning("drain period over; cancelling %d requests", self.inflight.count)

    async def _close_listener(self, listener: Listener) -> None:
        # What is left of the drain period (nothing, if the drain ran out or never started).
        await listener.close(within_s=max(0.0, self._drain_deadline - time.monotonic()))

    # --- reload ---------------------------------------------------------------------------------
    async def reload(self) -> tuple[bool, list[str]]:
        """Read and validate the config file again; apply it if valid, else keep the running one."""
        if not self.config_path:
            return False, ["(file): this server was not started from a config file"]
        try:
            new = self._with_overrides(load_config(self.config_path))
            problems = [f"{field}: changing it needs a restart"
                        for field in ("listen", "admin_listen", "data_dir", "shared", "fast_lane")
                        if getattr(new, field) != getattr(self.cfg, field)]
            problems += [f"jobs.{field}: changing it needs a restart" for field in ("enabled", "store", "dsn", "db_path")
                         if getattr(new.jobs, field) != getattr(self.cfg.jobs, field)]
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("invalid").inc()
            log.error("reload refused, still running the previous config: %s", "; ".join(exc.problems))
            return False, exc.problems
        async with self._reload_lock:
            self.cfg = new
            # Each component takes the sections it owns.
            self.auth.reconfigure(new.auth)
            self.body.reconfigure(new.limits)
            self.planner.reconfigure(new.tiers, new.pools, new.cache, new.timeouts, new.limits.max_tokens_default)
            self.gate.reconfigure(new.tiers, [p.name for p in new.pools])
            self.core.reconfigure(new.tiers, new.auth.keys, new.cache, new.timeouts, new.routing)
            self.pools.reconfigure(new.routing.slow_start_s, new.outlier.restart_after_ejections)
            if self.jobs is not None:
                self.jobs.reconfigure(new.jobs, new.jobs_tier(), new.auth.keys)
            changes = await self.supervisor.apply(new.pools, new.workers, new.outlier, new.timeouts.drain_s)
        self.metrics.config_reloads.labels("applied").inc()
        log.info("config reloaded: %s", "; ".join(changes) or "no worker changes")
        return True, changes

    def _with_overrides(self, cfg: Config) -> Config:
        return msgspec.structs.replace(cfg, listen=self.listen_override) if self.listen_override else cfg

    def status_line(self) -> str:
        workers = list(self.pools.workers.values())
        ready = sum(1 for w in workers if w.state.value == "ready")
        queued = sum(a.queued() for a in self.gate.admissions.values())
        return f"{ready}/{len(workers)} workers ready, {self.inflight.count} requests in flight, {queued} queued"


async def _cancel_and_wait(tasks: set[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve(cfg: Config, config_path: str | None = None, listen_override: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (1 when the appliance could not start)."""
    stop_budget = cfg.timeouts.drain_s + cfg.workers.stop_grace_s
    if stop_budget > SYSTEMD_STOP_BUDGET_S - 10:
        log.warning("timeouts.drain_s + workers.stop_grace_s = %.0fs leaves under 10s of the systemd unit's "
                    "TimeoutStopSec=%.0f; raise it in the unit", stop_budget, SYSTEMD_STOP_BUDGET_S)
    appliance = Appliance(cfg, config_path, listen_override)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task] = set()  # reloads and the watchdog; cancelled and awaited at stop

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    # Signal handlers only queue work for the loop (gunicorn's rule).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(appliance.reload()))

    def hand_over() -> None:
        """SIGUSR2: drain and exit like SIGTERM, but leave the workers running (models loaded) for
        the next proxy to adopt: a restart or an upgrade of the proxy that reloads no model."""
        if appliance.cfg.workers.orphan_timeout_s <= 0:
            log.warning("SIGUSR2 (hand over): workers.orphan_timeout_s is 0, so workers die with the proxy; "
                        "stopping normally")
        else:
            log.info("SIGUSR2: handing over - draining, then exiting with the workers left for the next proxy")
            appliance.supervisor.hand_over = True
        stop.set()
    loop.add_signal_handler(signal.SIGUSR2, hand_over)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(_cancel_and_wait, background)
        try:
            await appliance.start(stack)
        except StartupError as exc:
            log.error("%s; stopping what had started", exc)
            return 1
        settle_the_heap()
        spawn(systemd.watchdog_loop(appliance.status_line))
        systemd.notify("READY=1")
        await stop.wait()
        log.info("signal received: shutting down")
    log.info("stopped")
    return 0
