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
from proxy.errors import ApiError, NotFound, SlowClient
from proxy.metrics import Metrics
from proxy.serving.auth import Authenticator
from proxy.serving.core import Answer, ServingCore
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.serving.plan import Planner, RequestPlan, cache_directives
from proxy.serving.record import RequestRecord
from proxy.serving.responses import ChoiceStream, ResponseFormatter
from proxy.serving.responses_api import (ResponseBuilder, ResponseStore, StoredResponse, as_chat_request,
                                         conversation, parse_create)
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
                 body: JsonBodyReader, responses: ResponseStore) -> None:
        self.auth = auth
        self.planner = planner
        self.core = core
        self.metrics = metrics
        self.body = body
        self.responses = responses
        self.created = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self.chat_completions), web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.list_models), web.post("/v1/responses", self.create_response),
                web.get("/v1/responses/{id}", self.get_response), web.delete("/v1/responses/{id}", self.delete_response)]

    async def list_models(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        data = []
        for model in self.planner.models_for(principal):
            entry = {"id": model, "object": "model", "created": self.created, "owned_by": "fullpower"}
            context = self.core.context_length(self.planner.pool_for(model, principal, principal.tier))
            if context is not None:
                entry["max_model_len"] = context  # as vLLM reports it (clients size prompts by it)
            data.append(entry)
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
        plans = self.planner.plan_choices(principal, request.headers.get("X-Priority"), req,
                                          cache_directives(request.headers.get("Cache-Control", "")),
                                          choose_pool=self.core.choose_pool, context_of=self.core.context_length)
        plan = plans[0]
        rec.tier, rec.planned_model = plan.tier, self.planner.pools[plan.pool].model
        fmt = ResponseFormatter(plan.chat, plan.model, plan.shape, plan.params.logprobs)
        if plan.plain:
            async with self.core.answer(plan, rec) as answer:
                if plan.stream:
                    return await self._stream(request, rec, plan, answer, fmt)
                return await self._complete(rec, [answer], fmt)
        # Several choices, tool calls or logprobs: each choice is admitted and generated on its own.
        async with contextlib.AsyncExitStack() as stack:
            answers = [await stack.enter_async_context(self.core.answer(p, rec)) for p in plans]
            if plan.stream:
                return await self._stream_choices(request, rec, plan, answers, fmt)
            return await self._complete(rec, answers, fmt)

    # --- the Responses API ----------------------------------------------------------------------
    async def create_response(self, request: web.Request) -> web.StreamResponse:
        rec: RequestRecord = request["record"]
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        rec.key = principal.key_name
        req = parse_create(await self.body.read(request))
        rec.model = req.model
        earlier = []
        if req.previous_response_id:
            stored = self.responses.get(req.previous_response_id, principal.key_name)
            if stored is None:
                raise NotFound(f"Response with id '{req.previous_response_id[:80]}' not found (stored responses are "
                               "kept in memory for a limited time).", param="previous_response_id")
            earlier = stored.messages
        messages = conversation(req, earlier)
        history = messages[1:] if req.instructions else messages  # instructions are not carried over
        plan = self.planner.plan(principal, request.headers.get("X-Priority"), as_chat_request(req, messages),
                                 cache_directives(request.headers.get("Cache-Control", "")),
                                 choose_pool=self.core.choose_pool, context_of=self.core.context_length)
        rec.tier, rec.planned_model = plan.tier, self.planner.pools[plan.pool].model
        builder = ResponseBuilder(req, plan.shape, stored=bool(req.store))

        def store(body: dict, turn: list) -> None:
            if req.store:
                self.responses.put(builder.id, StoredResponse(principal.key_name, body, history + turn))

        async with self.core.answer(plan, rec) as answer:
            if plan.stream:
                return await self._stream_response(request, rec, plan, answer, builder, store)
            collected = await answer.collect()
            finished_at = time.monotonic()
        body, _, turn = builder.outcome(collected)
        store(body, turn)
        rec.overhead_s = overhead_s(rec, answer, time.monotonic(), finished_at)
        return web.Response(body=_json.encode(body), content_type="application/json",
                            headers=self._headers(rec, answer))

    async def _stream_response(self, request: web.Request, rec: RequestRecord, plan: RequestPlan, answer: Answer,
                               builder: ResponseBuilder, store) -> web.StreamResponse:
        response = sse = None
        async with contextlib.aclosing(answer.frames()) as frames:
            try:
                async for batch in frames:
                    out: list[bytes] = []
                    if response is None:
                        rec.overhead_s = overhead_s(rec, answer, time.monotonic())
                        response = web.StreamResponse(headers={
                            **self._headers(rec, answer), "Content-Type": "text/event-stream",
                            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                        await response.prepare(request)
                        sse = SseWriter(request, response, plan.write_timeout_s)
                        out.extend(builder.start_events())
                    if batch is None:
                        out.append(b": keep-alive\n\n")
                    else:
                        end = batch[-1] if isinstance(batch[-1], Finished) else None
                        out.extend(builder.tokens(batch[:-1] if end is not None else batch))
                        if end is not None:
                            events, body, turn = builder.finish_events(end)
                            out.extend(events)
                            store(body, turn)
                    if out:
                        await sse.write(b"".join(out))
            except ApiError as exc:
                if response is None:
                    raise
                rec.fail(exc)
                await sse.write(builder.event("error", code=exc.code or exc.type, message=exc.message,
                                              param=exc.param))
        await sse.write(None)
        return response

    async def get_response(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        stored = self.responses.get(request.match_info["id"], principal.key_name)
        if stored is None:
            raise NotFound(f"Response with id '{request.match_info['id'][:80]}' not found.", param="response_id")
        return web.Response(body=_json.encode(stored.body), content_type="application/json")

    async def delete_response(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        response_id = request.match_info["id"]
        if not self.responses.delete(response_id, principal.key_name):
            raise NotFound(f"Response with id '{response_id[:80]}' not found.", param="response_id")
        return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    @staticmethod
    def _headers(rec: RequestRecord, answer: Answer) -> dict[str, str]:
        return {"X-Request-Id": rec.id, "X-Fullpower-Backend": rec.worker or "",
                "X-Fullpower-Model": rec.served_model or "", "X-Fullpower-Cache": answer.cache_header,
                "X-Fullpower-Overhead-Ms": f"{rec.overhead_s * 1000:.3f}"}

    async def _complete(self, rec: RequestRecord, answers: list[Answer], fmt: ResponseFormatter) -> web.Response:
        if len(answers) == 1:
            outcomes = [await answers[0].collect()]
        else:
            outcomes = await asyncio.gather(*(a.collect() for a in answers))
        finished_at = time.monotonic()
        body = _json.encode(fmt.complete_choices(outcomes))
        rec.overhead_s = overhead_s(rec, answers[0], time.monotonic(), finished_at)
        return web.Response(body=body, content_type="application/json", headers=self._headers(rec, answers[0]))

    async def _stream_choices(self, request: web.Request, rec: RequestRecord, plan: RequestPlan,
                              answers: list[Answer], fmt: ResponseFormatter) -> web.StreamResponse:
        """The general stream: every choice's frames, merged as they come, each formatted by its
        ChoiceStream (tool calls, logprobs, several choices)."""
        choices = [ChoiceStream(fmt, i, plan.include_usage) for i in range(len(answers))]
        merged: asyncio.Queue = asyncio.Queue(maxsize=4 * len(answers))  # pumps wait while the client is behind

        async def pump(index: int, answer: Answer) -> None:
            try:
                async with contextlib.aclosing(answer.frames()) as frames:
                    async for batch in frames:
                        await merged.put((index, batch))
            except ApiError as exc:
                await merged.put((index, exc))

        pumps = [asyncio.create_task(pump(i, a)) for i, a in enumerate(answers)]
        sse = response = None
        finished: dict[int, Finished] = {}
        try:
            while len(finished) < len(answers):
                index, batch = await merged.get()
                if isinstance(batch, ApiError) and response is None:
                    raise batch
                out: list[bytes] = []
                if response is None:
                    rec.overhead_s = overhead_s(rec, answers[0], time.monotonic())
                    response = web.StreamResponse(headers={
                        **self._headers(rec, answers[0]), "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                    await response.prepare(request)
                    sse = SseWriter(request, response, plan.write_timeout_s)
                    out.extend(c.first() for c in choices)
                if isinstance(batch, ApiError):
                    rec.fail(batch)  # after the first byte the status is sent: report it in-band
                    await sse.write(b"".join(out) + b"data: " + batch.body() + b"\n\n")
                    break
                if batch is None:
                    out.append(b": keep-alive\n\n")
                else:
                    end = batch[-1] if isinstance(batch[-1], Finished) else None
                    out.extend(choices[index].tokens(batch[:-1] if end is not None else batch))
                    if end is not None:
                        finished[index] = end
                        out.extend(choices[index].finish(end))
                        if len(finished) == len(answers):
                            if plan.include_usage:
                                extra = sum(f.completion_tokens for i, f in finished.items() if i)
                                out.append(_sse(fmt.usage_chunk(finished[0], extra)))
                            out.append(b"data: [DONE]\n\n")
                if out:
                    await sse.write(b"".join(out))
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        await sse.write(None)
        return response

    async def _stream(self, request: web.Request, rec: RequestRecord, plan: RequestPlan, answer: Answer,
                      fmt: ResponseFormatter) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        include_usage = plan.include_usage
        sse: SseWriter | None = None

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
                        sse = SseWriter(request, response, plan.write_timeout_s)
                        out.append(_sse(fmt.first_chunk(include_usage)))
                        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
                    if batch is None:
                        out.append(b": keep-alive\n\n")
                        await sse.write(b"".join(out))
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
                    if len(tokens) > 1 and (sse.behind or len(tokens) >= MERGE_BACKLOG):
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
                        await sse.write(out[0] if len(out) == 1 else b"".join(out))
                    if not direct_on and finished is None:
                        # from the first token on (`last` is set), tokens may take the direct path
                        direct_on = answer.deliver_directly(direct)
            except ApiError as exc:
                if response is None:
                    raise
                # After the first byte the status is sent: report the error in-band, never hang.
                rec.fail(exc)
                await sse.write(b"data: " + exc.body() + b"\n\n")
        await sse.write(None)
        return response


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

    async def write(self, data: bytes | None) -> None:
        """One write (None: the end of the stream)."""
        transport = self.request.transport
        response = self.response
        self.behind = transport is not None and transport.get_write_buffer_size() > 0
        if transport is not None and not self.behind and (data is None or len(data) < FAST_WRITE_BYTES):
            await (response.write_eof() if data is None else response.write(data))
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await (response.write_eof() if data is None else response.write(data))
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise SlowClient(f"the client took no bytes for {self.timeout_s:.0f}s") from None


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"
