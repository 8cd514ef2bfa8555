"""The OpenAI endpoints. A handler turns HTTP into a RequestPlan (authenticate, parse, plan), asks
the serving core for the answer, and formats its frames: one JSON body, or server-sent events
exactly as OpenAI sends them. Of the RequestRecord it writes the key, tier and model it planned and
the proxy's own overhead."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from aiohttp import web

from backend.protocol import Finished
from proxy.errors import ApiError, SlowClient
from proxy.metrics import Metrics
from proxy.serving.auth import Authenticator
from proxy.serving.core import Answer, ServingCore
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.serving.plan import Planner, RequestPlan, cache_directives
from proxy.serving.record import RequestRecord
from proxy.serving.responses import ResponseFormatter
from proxy.http.server import JsonBodyReader

_json = msgspec.json.Encoder()
MERGE_BACKLOG = 64  # tokens pending for one stream at once: it is behind, whatever its socket says
FAST_WRITE_BYTES = 16384  # below aiohttp's 64 KiB high-water mark: such a write into an empty buffer never waits


def overhead_s(rec: RequestRecord, answer: Answer, now: float, finished_at: float | None = None) -> float:
    """Time spent in the proxy itself: before dispatch (less the queue wait) and after the last
    frame. A cache hit or a coalesced answer is all proxy time."""
    if answer.cache in ("hit", "coalesced"):
        return now - rec.started
    dispatched = answer.dispatched_at or now
    before = max(0.0, (dispatched - rec.started) - (rec.queue_s or 0.0))
    return before + (now - finished_at if finished_at is not None else 0.0)


class OpenAIHandlers:
    def __init__(self, auth: Authenticator, planner: Planner, core: ServingCore, metrics: Metrics,
                 body: JsonBodyReader) -> None:
        self.auth = auth
        self.planner = planner
        self.core = core
        self.metrics = metrics
        self.body = body
        self.created = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self.chat_completions), web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.list_models)]

    async def list_models(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        data = [{"id": m, "object": "model", "created": self.created, "owned_by": "fullpower"}
                for m in self.planner.models_for(principal)]
        return web.Response(body=_json.encode({"object": "list", "data": data}), content_type="application/json")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, ChatCompletionRequest)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CompletionRequest)

    async def _serve(self, request: web.Request, kind: type) -> web.StreamResponse:
        rec: RequestRecord = request["record"]
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        rec.key = principal.key_name
        req = parse(await self.body.read(request), kind)
        rec.model = req.model
        plan = self.planner.plan(principal, request.headers.get("X-Priority"), req,
                                 cache_directives(request.headers.get("Cache-Control", "")),
                                 choose_pool=self.core.choose_pool, context_of=self.core.context_length)
        rec.tier, rec.planned_model = plan.tier, self.planner.pools[plan.pool].model
        fmt = ResponseFormatter(plan.chat, plan.model)
        async with self.core.answer(plan, rec) as answer:
            if plan.stream:
                return await self._stream(request, rec, plan, answer, fmt)
            return await self._complete(rec, answer, fmt)

    @staticmethod
    def _headers(rec: RequestRecord, answer: Answer) -> dict[str, str]:
        return {"X-Request-Id": rec.id, "X-Fullpower-Backend": rec.worker or "",
                "X-Fullpower-Model": rec.served_model or "", "X-Fullpower-Cache": answer.cache_header,
                "X-Fullpower-Overhead-Ms": f"{rec.overhead_s * 1000:.3f}"}

    async def _complete(self, rec: RequestRecord, answer: Answer, fmt: ResponseFormatter) -> web.Response:
        text, finished = await answer.collect()
        finished_at = time.monotonic()
        body = _json.encode(fmt.complete(text, finished))
        rec.overhead_s = overhead_s(rec, answer, time.monotonic(), finished_at)
        return web.Response(body=body, content_type="application/json", headers=self._headers(rec, answer))

    async def _stream(self, request: web.Request, rec: RequestRecord, plan: RequestPlan, answer: Answer,
                      fmt: ResponseFormatter) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        include_usage = plan.include_usage
        write_timeout = plan.write_timeout_s
        behind = False  # the last write found bytes the client had not taken yet

        async def write(data: bytes | None) -> None:
            """One write (None: the end of the stream). Bounded: aiohttp buffers up to its
            high-water mark, then waits for the socket to drain; a client that stops reading is
            cut here, and leaving the answer block frees its slot. With nothing unsent in the
            transport a small write cannot block, so it needs no timer (the common case)."""
            nonlocal behind
            transport = request.transport
            behind = transport is not None and transport.get_write_buffer_size() > 0
            if transport is not None and not behind and (data is None or len(data) < FAST_WRITE_BYTES):
                await (response.write_eof() if data is None else response.write(data))
                return
            try:
                async with asyncio.timeout(write_timeout):
                    await (response.write_eof() if data is None else response.write(data))
            except TimeoutError:
                if request.transport is not None:
                    request.transport.abort()
                raise SlowClient(f"the client took no bytes for {write_timeout:.0f}s") from None

        inter_token = self.metrics.child(self.metrics.inter_token, plan.tier)
        last = None
        direct_on = False  # the direct path is switched on (once, after the first tokens went out)

        def direct(item) -> bool:
            """The direct path (see RequestStream): a token's event written into the client's
            transport from the worker connection's callback, when nothing waits to be sent - so it
            cannot block, and order is kept. Declines (False) whenever the task must do it."""
            nonlocal last
            transport = request.transport
            if transport is None or transport.is_closing() or transport.get_write_buffer_size():
                return False
            if item.text:
                event = fmt.delta_event(item.text, include_usage)
                # aiohttp's chunked framing, written whole: the writer's own state stays valid
                transport.write(b"%x\r\n%b\r\n" % (len(event), event) if chunked else event)
                now = time.monotonic()
                inter_token.observe(now - last)
                last = now
            return True

        async with contextlib.aclosing(answer.frames()) as frames:
            try:
                async for batch in frames:
                    out: list[bytes] = []
                    if response is None:
                        # Headers go out with the first frame, so a worker lost before it is retried
                        # invisibly and the headers name the worker that served.
                        rec.overhead_s = overhead_s(rec, answer, time.monotonic())
                        response = web.StreamResponse(headers={
                            **self._headers(rec, answer), "Content-Type": "text/event-stream",
                            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                        await response.prepare(request)
                        out.append(_sse(fmt.first_chunk(include_usage)))
                        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
                    if batch is None:
                        out.append(b": keep-alive\n\n")
                        await write(b"".join(out))
                        continue
                    now = time.monotonic()
                    if last is not None:
                        inter_token.observe(now - last)
                    last = now
                    # Everything that arrived since the last write goes out in one write: one event
                    # per token while the client keeps up; merged into one event (the same text)
                    # when the client is behind (the last write found bytes it had not taken) or
                    # the stream is far behind the worker (a backlog of MERGE_BACKLOG tokens).
                    finished = batch[-1] if isinstance(batch[-1], Finished) else None
                    tokens = batch[:-1] if finished is not None else batch
                    if len(tokens) > 1 and (behind or len(tokens) >= MERGE_BACKLOG):
                        text = "".join([item.text for item in tokens])
                        if text:
                            out.append(fmt.delta_event(text, include_usage))
                    else:
                        out.extend([fmt.delta_event(item.text, include_usage) for item in tokens if item.text])
                    if finished is not None:
                        out.append(_sse(fmt.final_chunk(finished.finish_reason, include_usage)))
                        if include_usage:
                            out.append(_sse(fmt.usage_chunk(finished)))
                        out.append(b"data: [DONE]\n\n")
                    if out:
                        await write(out[0] if len(out) == 1 else b"".join(out))
                    if not direct_on and finished is None:
                        # from the first token on (`last` is set), tokens may take the direct path
                        direct_on = answer.deliver_directly(direct)
            except ApiError as exc:
                if response is None:
                    raise
                # After the first byte the status is sent: report the error in-band, never hang.
                rec.fail(exc)
                await write(b"data: " + exc.body() + b"\n\n")
        await write(None)
        return response


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"
