"""The fast lane: OpenAI chat/completions requests served straight from the socket.

aiohttp's server costs about 40 µs of CPU per request on the development machine (request and
response objects, its per-connection task, the writer), several times what our own handling of a
cache hit costs. The public listener's connections therefore start on this lane: a protocol that
cuts whole requests out of the byte stream itself, parses each head with llhttp (httptools), and
serves the common case - `POST /v1/chat/completions` or `/v1/completions`, HTTP/1.1 keep-alive,
a JSON body with a Content-Length within the limits - by calling the same OpenAI handler through
the same request context (record, access log, metrics, errors, drain) as aiohttp would. A plain
answer goes out in one write; a stream goes out as chunked server-sent events through
`LaneStreamResponse` (the handler's SseWriter, direct path and write timeout work unchanged:
writes wait while the socket is above its high-water mark, as aiohttp's do).

Anything else - another path or method, chunked or oversized bodies, `Expect`, `Upgrade`,
`Connection: close`, heads near the header limits, bytes llhttp refuses, a body slower than
`limits.body_timeout_s` - is handed to aiohttp at a request boundary, with every byte of that
request: the connection's protocol becomes aiohttp's request handler for the rest of its life, so
every behaviour of the aiohttp path (its parser's errors, limits and timeouts) stays exactly as it
was.

One request at a time per connection (HTTP/1.1 answers in order): bytes that arrive meanwhile wait
in the buffer, bounded (reading pauses beyond it), and a client that goes away cancels its request
like aiohttp's handler cancellation does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Awaitable, Callable

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Limits
from proxy.http.fast_lane_request import FastRequest
from proxy.metrics import Metrics

log = logging.getLogger("fullpower")

Handler = Callable[["FastRequest"], Awaitable[web.StreamResponse]]
HEAD_END = b"\r\n\r\n"
# Headers whose presence sends a request to aiohttp: their semantics are aiohttp's to keep.
_HAND_OVER_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_LANE_HEADERS = frozenset({"Content-Length", "Connection", "Date", "Server"})  # the lane writes these itself


class FastLane:
    """What the lane serves, shared by its connections: `routes` maps a path to the handler, run
    through `run(request, handler)` (the request context, as aiohttp's middleware runs it)."""

    def __init__(self, routes: dict[bytes, Handler], run: Callable[[FastRequest, Handler], Awaitable],
                 limits: Callable[[], Limits], max_header_count: int, max_header_bytes: int,
                 header_timeout_s: float, server_header: str, metrics: Metrics) -> None:
        self.routes = routes
        self.served = metrics.fast_lane_requests
        self.handovers = metrics.fast_lane_handovers
        self.server_header = server_header
        self._status_lines: dict[int, str] = {}
        self.run = run
        self.limits = limits  # the live limits (a reload may change the body bounds)
        self.max_header_count = max_header_count
        self.max_header_bytes = max_header_bytes
        self.header_timeout_s = header_timeout_s
        # A head is handed to aiohttp long before this: it cannot be valid for aiohttp's limits.
        self.max_head_bytes = max_header_bytes * (max_header_count + 2)
        self._date = (0, "")

    def date_line(self) -> str:
        """The Date header's line, made once a second."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n")
        return self._date[1]

    def status_line(self, status: int) -> str:
        """The status line and the Server header's line, made once per status."""
        line = self._status_lines.get(status)
        if line is None:
            line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nServer: {self.server_header}\r\n"
            if len(self._status_lines) < 1000:  # bounded: statuses are three digits
                self._status_lines[status] = line
        return line


class _Head:
    """llhttp's callbacks for one request head."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


class FastLaneConnection(asyncio.Protocol):
    """One client connection while it is on the fast lane (see the module's docstring).

    `manager` is the aiohttp server of the listener: the connection registers with it like
    aiohttp's own handlers (so a listener's shutdown closes and waits for it too), and
    `make_handler()` is the aiohttp request handler it hands over to."""

    def __init__(self, lane: FastLane, manager, make_handler: Callable[[], asyncio.Protocol]) -> None:
        self._lane = lane
        self._manager = manager
        self._make_handler = make_handler
        self._task_handler = None  # aiohttp's server reads this of every connection it tracks
        self.transport: asyncio.Transport | None = None
        self._remote = ""
        self._buf = bytearray()
        self._busy: asyncio.Task | None = None  # the request being served
        # the head's (and idle keep-alive's) or the body's timeout: a deadline, and the timer that wakes it
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        # the parsed head of the request whose body is still arriving (parsed once, however many reads)
        self._waiting: tuple | None = None
        self._head_sent = False  # the current request's response head went out (a stream's)
        self._unsent_head: bytes | None = None  # a stream's head, until its first body write (write_head)
        self._closing = False  # close once the current request is answered
        self._paused = False  # reading paused: the client is far ahead of its answers
        self._drained: asyncio.Future | None = None  # set while the transport is above its high-water mark

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, (tuple, list)) and peer else ""
        self._manager.connection_made(self, transport)
        self._arm(self._lane.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy is None:
            self._next()
        elif len(self._buf) > self._lane.max_head_bytes + self._lane.limits().max_body_bytes and not self._paused:
            self._paused = True  # a client far ahead of its answers waits in its own socket
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def write(self, data: bytes) -> None:
        """Write, then wait while the client is behind (the caller bounds the wait: SseWriter)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        if self._unsent_head is not None:
            data, self._unsent_head = self._unsent_head + data, None
        self.transport.write(data)
        if self._drained is not None:
            await asyncio.shield(self._drained)

    def write_head(self, response) -> None:
        """The status line and headers of a response whose body follows in chunks: held until the
        body's first write (the handlers write their first events in the same step), so that both
        leave in one send."""
        keep_alive = response.keep_alive is not False and not self._closing
        self._unsent_head = self._head(response, keep_alive)
        self._head_sent = True

    def eof_received(self) -> None:
        return None  # close; a request in flight is cancelled (as on aiohttp's lane)

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        self._manager.connection_lost(self, exc)
        self.resume_writing()  # a writer waiting to drain finds the transport closing
        if self._busy is not None:
            self._busy.cancel()

    # --- aiohttp's server asks these at shutdown ----------------------------------------------
    def close(self) -> None:
        self._closing = True
        if self._busy is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None) -> None:
        self._closing = True
        busy = self._busy
        if busy is not None:
            done, _ = await asyncio.wait({busy}, timeout=timeout)
            if not done:
                busy.cancel()
                await asyncio.gather(busy, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    # --- requests -----------------------------------------------------------------------------
    def _next(self) -> None:
        """Serve the next whole request in the buffer, wait for more bytes, or hand over."""
        lane, buf = self._lane, self._buf
        end = buf.find(HEAD_END, 0, lane.max_head_bytes + len(HEAD_END))
        if end < 0:
            if len(buf) > lane.max_head_bytes or buf.find(b"\n\n", 0, lane.max_head_bytes) >= 0:
                self._hand_over()  # too long, or lines ended by a bare LF: aiohttp's parser answers
            return
        head_len = end + len(HEAD_END)
        if self._waiting is None:
            if buf.count(b"\n", 0, head_len) != buf.count(b"\r\n", 0, head_len):
                self._hand_over()  # a bare LF inside the head
                return
            head = _Head()
            parser = httptools.HttpRequestParser(head)
            try:
                parser.feed_data(bytes(buf[:head_len]))
            except httptools.HttpParserError:
                self._hand_over()  # aiohttp's parser answers it (a 400, as on its own lane)
                return
            route = self._eligible(parser, head)
            if route is None:
                self._hand_over()
                return
            if len(buf) < head_len + route[-1]:
                self._waiting = route
                self._arm(lane.limits().body_timeout_s)  # a body slower than this goes to aiohttp
                return
        else:
            route = self._waiting
            if len(buf) < head_len + route[-1]:
                return
        handler, path, headers, length = route
        body = bytes(buf[head_len:head_len + length])
        del buf[:head_len + length]
        self._cancel_timer()
        self._waiting = None
        self._head_sent, self._unsent_head = False, None
        request = FastRequest("POST", path, headers, self._remote, body, self)  # the lane serves POSTs only
        self._busy = asyncio.get_running_loop().create_task(self._serve(handler, request))

    def _eligible(self, parser: httptools.HttpRequestParser, head: _Head):
        """(handler, path, headers, content length) for a request this lane serves, else None."""
        lane = self._lane
        if not head.complete or parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return None
        if not parser.should_keep_alive():
            return None
        path = head.url.partition(b"?")[0]
        handler = lane.routes.get(path)
        if handler is None or len(head.url) + 16 > lane.max_header_bytes:
            return None
        if len(head.headers) > lane.max_header_count:
            return None
        length = -1
        pairs = []
        for name, value in head.headers:
            if len(name) + len(value) + 4 > lane.max_header_bytes:
                return None
            lower = name.lower()
            if lower in _HAND_OVER_HEADERS:
                return None
            if lower == b"content-length":
                if length >= 0 or not value.strip().isdigit():
                    return None
                length = int(value)
            pairs.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
        if length < 0 or length > lane.limits().max_body_bytes:
            return None
        return handler, path.decode(), CIMultiDictProxy(CIMultiDict(pairs)), length

    async def _serve(self, handler: Handler, request: FastRequest) -> None:
        try:
            response = await self._lane.run(request, handler)
            stream = getattr(response, "finished", None)
            if stream is not None:  # a LaneStreamResponse: written already, whole if finished
                keep_alive = stream and response.keep_alive is not False and not self._closing
            elif self._head_sent:
                keep_alive = False  # an error after a stream's head: closing is all that is left
            else:
                keep_alive = response.keep_alive is not False and not self._closing
                self.transport.write(self._encode(response, keep_alive))
            self._lane.served.inc()
        except asyncio.CancelledError:
            self._busy = None
            return  # the client went away, or the listener is shutting down
        except ConnectionError:  # the transport closed under a write (a client cut as too slow, say)
            keep_alive = False
        except Exception:  # noqa: BLE001 - the request context answers every error; this is a bug
            log.exception("fast lane: could not answer a request")
            keep_alive = False
        self._busy = None
        if not keep_alive:
            self.transport.close()
            return
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._arm(self._lane.header_timeout_s)
        if self._buf:
            self._next()

    def _encode(self, response: web.StreamResponse, keep_alive: bool) -> bytes:
        """The whole HTTP/1.1 response, as aiohttp would send it (Date, Server, length)."""
        body = response.body or b""
        return self._head(response, keep_alive, len(body)) + body

    def _head(self, response, keep_alive: bool, length: int | None = None) -> bytes:
        lane = self._lane
        lines = [lane.status_line(response.status)]  # ends with the Server header's line
        for name, value in response.headers.items():
            if name not in _LANE_HEADERS:
                lines.append(f"{name}: {value}\r\n")
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append(lane.date_line())
        if not keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    # --- handing over and timers --------------------------------------------------------------
    def _hand_over(self) -> None:
        """From this request on, aiohttp serves the connection (every byte of the request included)."""
        self._stop_timer()
        self._lane.handovers.inc()
        transport, data = self.transport, bytes(self._buf)
        self._buf = bytearray()
        self._manager.connection_lost(self, None)
        self.transport = None
        handler = self._make_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    # The connection's one timeout is a deadline, and the timer only wakes it: a keep-alive
    # connection moves its deadline on every request, and making a new timer each time showed as
    # 2-3% of the proxy's samples per cache hit (py-spy). The timer that is already set wakes up, finds the deadline
    # moved and sleeps again until it.
    def _arm(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout_s
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timeout)

    def _cancel_timer(self) -> None:
        self._deadline = None  # the timer, if set, wakes to nothing

    def _stop_timer(self) -> None:
        """For good: the connection closed or left the lane."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timeout)
            return
        self._deadline = None
        if self._busy is not None or self.transport is None:
            return
        if self._waiting is not None:
            self._hand_over()  # a slow body: aiohttp's body timeout and its 408 decide
        else:
            self.transport.close()  # an idle keep-alive or a head that never completed
