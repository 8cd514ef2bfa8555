"""Composition root: builds the components, the public and admin applications, and runs them with a
staged shutdown (stop accepting, drain in-flight work, stop the workers)."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import uuid

import msgspec
from aiohttp import web

from proxy import systemd
from proxy.api import OpenAIApi
from proxy.config import Config, parse_host_port
from proxy.errors import ApiError, MethodNotAllowed, NoWorkerReady, NotFound, PayloadTooLarge
from proxy.gate import Gate
from proxy.pool import PoolState
from proxy.supervisor import Supervisor

log = logging.getLogger("fullpower")
_json = msgspec.json.Encoder()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _error_response(exc: ApiError, request_id: str) -> web.Response:
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json",
                        headers={**exc.headers(), "X-Request-Id": request_id})


@web.middleware
async def request_context(request: web.Request, handler):
    """Request id in and out; every error becomes an OpenAI-shaped body (never a traceback)."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    request["request_id"] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        return _error_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status == 404:
            return _error_response(NotFound(f"Unknown path {request.path}."), request_id)
        if exc.status == 405:
            return _error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}."),
                                   request_id)
        if exc.status == 413:
            return _error_response(PayloadTooLarge("The request body is too large."), request_id)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in request %s", request_id)
        return _error_response(ApiError(f"Internal error; request id {request_id}."), request_id)
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", request_id)
    return response


class Appliance:
    """Owns every long-lived component; `start` and `stop` are the only lifecycle entry points."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pools = PoolState()
        self.supervisor = Supervisor(cfg, self.pools)
        self.gate = Gate(cfg, self.pools)
        self.api = OpenAIApi(cfg, self.pools, self.gate)
        self.draining = False
        self.inflight = 0
        self._runners: list[web.AppRunner] = []

    # --- applications ---------------------------------------------------------------------------
    def public_app(self) -> web.Application:
        app = web.Application(middlewares=[self._track_inflight, request_context],
                              client_max_size=self.cfg.limits.max_body_bytes)
        app.add_routes(self.api.routes())
        app.add_routes([web.get("/healthz", self.healthz), web.get("/readyz", self.readyz)])
        return app

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[request_context])
        app.add_routes([web.get("/admin/pool", self.admin_pool), web.get("/healthz", self.healthz),
                        web.get("/readyz", self.readyz)])
        return app

    @web.middleware
    async def _track_inflight(self, request: web.Request, handler):
        if self.draining and request.path.startswith("/v1/"):
            return _error_response(NoWorkerReady("The server is shutting down.", retry_after=1.0),
                                   request.headers.get("X-Request-Id", "") or uuid.uuid4().hex)
        self.inflight += 1
        try:
            return await handler(request)
        finally:
            self.inflight -= 1

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.pools.any_ready() and not self.draining
        return web.json_response({"ready": ready, "draining": self.draining}, status=200 if ready else 503)

    async def admin_pool(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        workers = [w.snapshot(now) for w in self.pools.workers.values()]
        return web.Response(body=_json.encode({"workers": workers, "draining": self.draining}),
                            content_type="application/json")

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.supervisor.start()
        for app, address in ((self.public_app(), self.cfg.listen), (self.admin_app(), self.cfg.admin_listen)):
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            host, port = parse_host_port(address)
            await web.TCPSite(runner, host, port, backlog=2048).start()
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
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.supervisor.stop()
        log.info("stopped")


async def serve(cfg: Config) -> None:
    appliance = Appliance(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await appliance.start()
    systemd.notify("READY=1")
    try:
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        await appliance.stop()
