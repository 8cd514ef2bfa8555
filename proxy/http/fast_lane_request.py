"""What the fast lane's handlers see (proxy/http/fast_lane.py): a request and a streaming
response with the parts of aiohttp's web.Request and web.StreamResponse that the OpenAI handlers,
the request context and http/sse.py use - so one handler serves both lanes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.http.fast_lane import FastLaneConnection


class _WholeBody:
    """`request.content` of a request whose body is all here (JsonBodyReader asks)."""

    @staticmethod
    def is_eof() -> bool:
        return True


class FastRequest(dict):
    """The part of aiohttp's web.Request the OpenAI handlers and the request context use: method,
    path, headers, the peer's address, the body, and the mapping the record is kept in."""

    __slots__ = ("method", "path", "headers", "remote", "_body", "_conn")
    content = _WholeBody()

    def __init__(self, method: str, path: str, headers: CIMultiDictProxy, remote: str, body: bytes,
                 conn: "FastLaneConnection") -> None:
        super().__init__()
        self.method, self.path, self.headers, self.remote, self._body = method, path, headers, remote, body
        self._conn = conn

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def json_response(self, body: bytes, headers: dict[str, str]) -> "LaneResponse":
        """A whole JSON answer (aiohttp's web.Response elsewhere); `headers` becomes the response's."""
        headers["Content-Type"] = "application/json"
        return LaneResponse(body, headers)

    def stream_response(self, headers: dict[str, str]) -> "LaneStreamResponse":
        """What http/sse.py opens an event stream with (aiohttp's web.StreamResponse elsewhere)."""
        return LaneStreamResponse(self._conn, headers)

    @property
    def content_length(self) -> int:
        return len(self._body)

    async def read(self) -> bytes:
        return self._body


class LaneResponse:
    """A whole answer the connection writes in one go: the part of aiohttp's web.Response that the
    request context and the lane use (status, body, headers, force_close). Its headers are a plain
    dict written in the canonical spelling of each name (as the handlers write them)."""

    __slots__ = ("body", "headers", "keep_alive")
    status = 200
    prepared = False

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.body = body
        self.headers = headers
        self.keep_alive: bool | None = None

    def force_close(self) -> None:
        self.keep_alive = False


class LaneStreamResponse:
    """A chunked response written straight into the connection's transport: the part of aiohttp's
    web.StreamResponse that the streaming handlers use (prepare, write, write_eof, headers)."""

    status = 200
    body = None

    def __init__(self, conn: "FastLaneConnection", headers: dict[str, str]) -> None:
        self._conn = conn
        self.headers = CIMultiDict(headers)
        self.prepared = False
        self.finished = False  # the last chunk went out: the connection may carry the next request
        self.keep_alive: bool | None = None

    def force_close(self) -> None:
        self.keep_alive = False

    async def prepare(self, request) -> None:
        self.headers["Transfer-Encoding"] = "chunked"  # the direct path frames its writes by this
        self.prepared = True
        self._conn.write_head(self)

    async def write(self, data: bytes) -> None:
        if data:
            await self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def write_eof(self, data: bytes = b"") -> None:
        """The last chunk (if any) and the end of the body, in one write; again: nothing."""
        if self.finished:
            return
        self.finished = True
        await self._conn.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")
