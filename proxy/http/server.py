"""What every HTTP request passes through: the request context (request id, one RequestRecord,
errors as OpenAI-shaped bodies), the client's address, the count of API requests in flight that a
drain waits for, the JSON body reader, and the listener (runner) settings."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from http import HTTPStatus
from typing import Callable

import msgspec
from aiohttp import web, web_protocol, web_server

from proxy.config import Limits
from proxy.errors import (ApiError, MethodNotAllowed, NoWorkerReady, NotFound, PayloadTooLarge, RequestTimeout,
                          UnsupportedMediaType)
from proxy.http.fast_lane import FastLane, FastLaneConnection
from proxy.metrics import Metrics
from proxy.serving.record import RequestRecord, new_request_id

log = logging.getLogger("fullpower")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_json = msgspec.json.Encoder()
LAST_WRITES_S = 0.5  # the least time handlers get to finish when a listener closes


def error_response(exc: ApiError, request_id: str) -> web.Response:
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


class InflightRequests:
    """API requests in flight: the drain at shutdown waits for this to reach zero (an event set by
    the last one out, not a polling loop), and new API requests are refused once draining."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        # Socket activation: a successor takes the new connections, so requests on connections this
        # process had already accepted are still served while draining (each told to close its
        # connection) instead of refused.
        self.handover = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining and not self.handover:
            raise NoWorkerReady("The server is shutting down.", retry_after=1.0)
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until no API request is in flight, at most `timeout` seconds; True if none is left."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass
        return self.count == 0


class RequestContext:
    """The middleware of both listeners: request id in and out, one record per request (access log
    and metrics, written at its end), and every error as an OpenAI-shaped body (never a traceback)."""

    def __init__(self, client_address: ClientAddress, inflight: InflightRequests, metrics: Metrics) -> None:
        self.client_address = client_address
        self.inflight = inflight
        self.metrics = metrics

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        return await self.run(request, handler)

    async def run(self, request, handler):
        """One request through its context: `request` is aiohttp's, or the fast lane's FastRequest."""
        incoming = request.headers.get("X-Request-Id", "")
        rec = RequestRecord(incoming if _REQUEST_ID.match(incoming) else new_request_id(),
                            self.client_address.of(request), request.method, request.path)
        request["record"] = rec
        # Only API requests are in-flight work that a drain waits for; a metrics scrape or an admin
        # rolling restart is not.
        api = request.path.startswith("/v1/")
        entered = False
        try:
            if api:
                self.inflight.enter()
                entered = True
            response = await handler(request)
            if not response.prepared:
                response.headers.setdefault("X-Request-Id", rec.id)
                if self.inflight.draining:
                    response.force_close()  # the next request goes to a fresh connection: the successor
            return response
        except ApiError as exc:
            rec.fail(exc)
            response = error_response(exc, rec.id)
            if rec.cache_header:
                response.headers["X-Fullpower-Cache"] = rec.cache_header
            return response
        except web.HTTPException as exc:
            api_error = _as_api_error(exc, request)
            if api_error is None:
                raise
            rec.fail(api_error)
            return error_response(api_error, rec.id)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            rec.fail(exc)
            raise
        except Exception:
            log.exception("unhandled error in request %s", rec.id)
            error = ApiError(f"Internal error; request id {rec.id}.")
            rec.fail(error)
            return error_response(error, rec.id)
        finally:
            if entered:
                self.inflight.leave()
            rec.finish(self.metrics)


class JsonBodyReader:
    """Reads a JSON request's whole body within the `limits` section's size and time bounds (shared
    by the OpenAI and jobs handlers; a reload swaps the limits)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def reconfigure(self, limits: Limits) -> None:
        self.limits = limits

    async def read(self, request: web.Request) -> bytes:
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json.")
        limit = self.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.")
        try:
            if request.content.is_eof():  # the whole body came with the head: no timer needed
                return await request.read()
            async with asyncio.timeout(self.limits.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.") from None
        except TimeoutError:
            raise RequestTimeout("The request body did not arrive in time.") from None


SERVER_HEADER = "fullpower"  # never aiohttp's "Python/x aiohttp/y"


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer of our applications names no library versions."""
    response.headers["Server"] = SERVER_HEADER


class _JsonErrorHandler(web_protocol.RequestHandler):
    """Errors raised before a request reaches an application (the HTTP parser's 400s, say) are
    answered like every other error: an OpenAI-shaped JSON body that echoes nothing the client
    sent, and no library versions in the Server header."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer went out: only closing is left
            raise ConnectionError("an answer was partly sent; cannot send an error")
        # A malformed request is the client's problem: one debug line, no traceback per request.
        log.debug("unparseable request from %s: %s", request.remote, exc)
        kind = "invalid_request_error" if status < 500 else "server_error"
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        body = _json.encode({"error": {"message": f"{phrase}: the request could not be parsed." if status < 500
                                       else phrase, "type": kind, "param": None, "code": None}})
        response = web.Response(status=status, body=body, content_type="application/json",
                                headers={"Server": SERVER_HEADER})
        response.force_close()
        return response


class _JsonErrorServer(web_server.Server):
    fast_lane: FastLane | None = None  # set on the public listener: connections start on the fast lane

    def __call__(self) -> web_protocol.RequestHandler | FastLaneConnection:
        if self.fast_lane is not None:
            return FastLaneConnection(self.fast_lane, self, self.aiohttp_handler)
        return self.aiohttp_handler()

    def aiohttp_handler(self) -> web_protocol.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Listener(web.AppRunner):
    """One listening application. keepalive_timeout runs from the connection's start (and from each
    response): a client that has not sent a whole request head by then is closed, so it doubles as
    the slow-header timeout."""

    def __init__(self, app: web.Application, limits: Limits,
                 fast_routes: dict[bytes, Callable] | None = None,
                 context: "RequestContext | None" = None, body: "JsonBodyReader | None" = None) -> None:
        super().__init__(app, handler_cancellation=True, access_log=None, keepalive_timeout=limits.header_timeout_s,
                         max_headers=limits.max_header_count, max_field_size=limits.max_header_bytes,
                         max_line_size=limits.max_header_bytes)
        self.fast_lane = None
        if fast_routes:
            # the same limits as aiohttp's parser above; the body bounds are read live (reload)
            self.fast_lane = FastLane(fast_routes, context.run, lambda: body.limits, limits.max_header_count,
                                      limits.max_header_bytes, limits.header_timeout_s, SERVER_HEADER,
                                      context.metrics)

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        ours = _JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                                handler_cancellation=server.handler_cancellation, loop=server._loop,
                                **server._kwargs)
        ours.fast_lane = self.fast_lane
        return ours

    async def close(self, within_s: float) -> None:
        """Stop listening, then give handlers still running at most `within_s` (what is left of the
        drain period) before they are cancelled. aiohttp reads this bound from the runner at
        cleanup; its default of 60 s would overrun the systemd stop budget, and aiohttp takes 0 (or
        less) as "no bound at all", so a spent drain still gets a short positive bound."""
        self._shutdown_timeout = max(LAST_WRITES_S, within_s)
        await self.cleanup()
