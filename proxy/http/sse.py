"""What every streaming endpoint shares: the response headers naming who served, the proxy's own
overhead, opening the event stream with the first frame, and bounded writes (SseWriter)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.errors import SlowClient
from proxy.serving.answer import Answer
from proxy.serving.record import RequestRecord

FAST_WRITE_BYTES = 16384  # below aiohttp's 64 KiB high-water mark: such a write into an empty buffer never waits


def overhead_s(rec: RequestRecord, answer: Answer, now: float, finished_at: float | None = None) -> float:
    """Time spent in the proxy itself: before dispatch (less the queue wait) and after the last
    frame. A cache hit or a coalesced answer is all proxy time."""
    if answer.cache in ("hit", "coalesced"):
        return now - rec.started
    dispatched = answer.dispatched_at or now
    before = max(0.0, (dispatched - rec.started) - (rec.queue_s or 0.0))
    return before + (now - finished_at if finished_at is not None else 0.0)


def response_headers(rec: RequestRecord, answer: Answer) -> dict[str, str]:
    return {"X-Request-Id": rec.id, "X-Fullpower-Backend": rec.worker or "",
            "X-Fullpower-Model": rec.served_model or "", "X-Fullpower-Cache": answer.cache_header,
            "X-Fullpower-Overhead-Ms": f"{rec.overhead_s * 1000:.3f}"}


async def open_event_stream(request: web.Request, rec: RequestRecord, answer: Answer,
                            write_timeout_s: float) -> tuple[web.StreamResponse, "SseWriter"]:
    """Send the headers of an event stream. Called with the first frame, so that a worker lost
    before it is retried invisibly and the headers name the worker that served."""
    rec.overhead_s = overhead_s(rec, answer, time.monotonic())
    # aiohttp's response, or the fast lane's (proxy/http/fast_lane.py) on a connection it serves
    make = getattr(request, "stream_response", None) or web.StreamResponse
    response = make(headers={
        **response_headers(rec, answer), "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response, SseWriter(request, response, write_timeout_s)


class SseWriter:
    """A stream's writes, bounded: aiohttp buffers up to its high-water mark, then waits for the
    socket to drain; a client that stops reading is cut here (SlowClient), and leaving the answer
    block frees its slot. With nothing unsent in the transport a small write cannot block, so it
    needs no timer (the common case)."""

    __slots__ = ("request", "response", "timeout_s", "behind")

    def __init__(self, request: web.Request, response: web.StreamResponse, timeout_s: float) -> None:
        self.request = request
        self.response = response
        self.timeout_s = timeout_s
        self.behind = False  # the last write found bytes the client had not taken yet

    async def write(self, data: bytes | None, end: bool = False) -> None:
        """One write (None: the end of the stream; end: these are its last bytes, sent with the end
        in one write where the response can - the fast lane's can). Ending twice is harmless."""
        transport = self.request.transport
        response = self.response
        self.behind = transport is not None and transport.get_write_buffer_size() > 0
        if data is None:
            data, end = b"", True
        if transport is not None and not self.behind and len(data) < FAST_WRITE_BYTES:
            await (response.write_eof(data) if end else response.write(data))
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await (response.write_eof(data) if end else response.write(data))
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise SlowClient(f"the client took no bytes for {self.timeout_s:.0f}s") from None
