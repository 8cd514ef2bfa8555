"""The OpenAI endpoints. A handler turns HTTP into a RequestPlan (authenticate, parse, plan), asks
the serving core for the answer, and formats its frames: one JSON body, or server-sent events
exactly as OpenAI sends them. Of the RequestRecord it writes the key, tier and model it planned and
the proxy's own overhead."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Callable

import msgspec
from aiohttp import web

from backend.protocol import Finished
from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.serving.auth import Authenticator
from proxy.serving.answer import Answer
from proxy.serving.core import ServingCore
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest
from proxy.serving.plan import Planner, RequestPlan
from proxy.serving.record import RequestRecord
from proxy.serving.responses import ChoiceStream, ResponseFormatter
from proxy.http.server import JsonBodyReader
from proxy.http.sse import SseWriter, open_event_stream, overhead_s, response_headers

_json = msgspec.json.Encoder()
MERGE_BACKLOG = 64  # tokens pending for one stream at once: it is behind, whatever its socket says


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

    def fast_routes(self) -> dict[bytes, Callable]:
        """The endpoints the fast lane serves (plain and streaming; proxy/http/fast_lane.py)."""
        return {b"/v1/chat/completions": self.chat_completions, b"/v1/completions": self.completions}

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
        headers = request.headers
        principal = self.auth.authenticate(headers.get("Authorization"))
        rec.key = principal.key_name
        body = await self.body.read(request)
        plans = self.planner.plan_body(principal, headers.get("X-Priority"), headers.get("Cache-Control", ""),
                                       body, kind, choose_pool=self.core.choose_pool,
                                       context_of=self.core.context_length, parsed=rec.parsed)
        plan = plans[0]
        rec.tier, rec.planned_model = plan.tier, self.planner.pools[plan.pool].model
        fmt = ResponseFormatter(plan.chat, plan.model, plan.shape, plan.params.logprobs)
        if plan.plain:
            async with self.core.answer(plan, rec) as answer:
                if plan.stream:
                    return await self._stream(request, rec, plan, answer, fmt)
                return await self._complete(request, rec, [answer], fmt)
        # Several choices, tool calls or logprobs: each choice is admitted and generated on its own.
        async with contextlib.AsyncExitStack() as stack:
            answers = [await stack.enter_async_context(self.core.answer(p, rec)) for p in plans]
            if plan.stream:
                return await self._stream_choices(request, rec, plan, answers, fmt)
            return await self._complete(request, rec, answers, fmt)

    async def _complete(self, request: web.Request, rec: RequestRecord, answers: list[Answer],
                        fmt: ResponseFormatter) -> web.Response:
        if len(answers) == 1:
            outcomes = [await answers[0].collect()]
        else:
            outcomes = await asyncio.gather(*(a.collect() for a in answers))
        finished_at = time.monotonic()
        body = fmt.complete_json(outcomes, answers[0].bodies)  # a cache hit's constant part is pre-built
        rec.overhead_s = overhead_s(rec, answers[0], time.monotonic(), finished_at)
        headers = response_headers(rec, answers[0])
        # the fast lane's own response where it serves (one write, no aiohttp objects), else aiohttp's
        lane_response = getattr(request, "json_response", None)
        if lane_response is not None:
            return lane_response(body, headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

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
                    response, sse = await open_event_stream(request, rec, answers[0], plan.write_timeout_s)
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

        def direct(text: str) -> bool:
            """The direct path (see RequestStream): a token's event written into the client's
            transport from the worker connection's callback, when nothing waits to be sent - so it
            cannot block, and order is kept. Declines (False) whenever the task must do it."""
            nonlocal last
            if transport.is_closing() or transport.get_write_buffer_size():
                return False
            if text:
                event = event_head + encode(text) + event_tail  # fmt.delta_event, inlined
                # aiohttp's chunked framing, written whole: the writer's own state stays valid
                transport.write(b"%x\r\n%b\r\n" % (len(event), event) if chunked else event)
                now = monotonic()
                observe(now - last)
                last = now
            return True

        # what the direct path uses per token, looked up once
        transport, monotonic, observe, encode = None, time.monotonic, inter_token.observe, _json.encode
        event_head, event_tail = fmt.delta_event_parts(include_usage)

        async with contextlib.aclosing(answer.frames()) as frames:
            try:
                async for batch in frames:
                    out: list[bytes] = []
                    if response is None:
                        response, sse = await open_event_stream(request, rec, answer, plan.write_timeout_s)
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
                    if out:  # the last events and the end of the body leave in one write
                        await sse.write(out[0] if len(out) == 1 else b"".join(out), end=finished is not None)
                    if not direct_on and finished is None and request.transport is not None:
                        # from the first token on (`last` is set), tokens may take the direct path
                        transport = request.transport
                        direct_on = answer.deliver_directly(direct)
            except ApiError as exc:
                if response is None:
                    raise
                # After the first byte the status is sent: report the error in-band, never hang.
                rec.fail(exc)
                await sse.write(b"data: " + exc.body() + b"\n\n")
        await sse.write(None)
        return response


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"
