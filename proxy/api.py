"""OpenAI endpoints. Handlers stay thin: parse once, authenticate, admit, run the generation,
format the answer (JSON or server-sent events exactly as OpenAI sends them)."""

from __future__ import annotations

import contextlib
import time
import uuid

import msgspec
from aiohttp import web

from backend.protocol import ChatMessage, Finished, Generate, SamplingParams
from proxy.auth import Authenticator
from proxy.config import Config
from proxy.errors import ApiError, NotFound, PayloadTooLarge, UnsupportedMediaType
from proxy.gate import Gate
from proxy.generation import Generation
from proxy.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.pool import PoolState

_json = msgspec.json.Encoder()


class OpenAIApi:
    def __init__(self, cfg: Config, pools: PoolState, gate: Gate) -> None:
        self.cfg = cfg
        self.pools = pools
        self.gate = gate
        self.auth = Authenticator(cfg)
        self.created = int(time.time())
        self.models = {}  # served model name -> pool name (first pool that serves it)
        for pool in cfg.pools:
            self.models.setdefault(pool.model, pool.name)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.list_models),
        ]

    async def list_models(self, request: web.Request) -> web.Response:
        self.auth.authenticate(request.headers.get("Authorization"))
        data = [{"id": m, "object": "model", "created": self.created, "owned_by": "fullpower"} for m in self.models]
        return _json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, ChatCompletionRequest)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CompletionRequest)

    # --- the shared path ------------------------------------------------------------------------
    async def _serve(self, request: web.Request, kind: type) -> web.StreamResponse:
        started = time.monotonic()
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        body = await self._read_body(request)
        req = parse(body, kind)
        pool = self._pool_for(req.model, principal.tier)
        pool_cfg = self.cfg.pool(pool)
        params = SamplingParams(
            max_tokens=req.output_limit() or self.cfg.limits.max_tokens_default,
            temperature=pool_cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=pool_cfg.default_top_p if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop_list())
        if kind is ChatCompletionRequest:
            messages = [ChatMessage(m.role, m.text(i)) for i, m in enumerate(req.messages)]

            def make(rid: int, resume: list[int]) -> Generate:
                return Generate(id=rid, params=params, messages=messages, resume_token_ids=resume)
        else:
            prompt = req.prompt_text()

            def make(rid: int, resume: list[int]) -> Generate:
                return Generate(id=rid, params=params, prompt=prompt, resume_token_ids=resume)

        t = self.cfg.timeouts
        gen = Generation(self.pools, pool, make, t.first_token_s, t.idle_s)
        ticket = await self.gate.acquire(pool, principal.tier)
        try:
            fmt = _Formatter(kind, req.model, request["request_id"])
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return await self._stream(request, gen, fmt, include_usage, started)
            return await self._complete(request, gen, fmt, started)
        finally:
            self.gate.release(ticket)

    async def _read_body(self, request: web.Request) -> bytes:
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json.")
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.") from None

    def _pool_for(self, model: str, tier: str) -> str:
        tier_pool = self.cfg.tier(tier).pool
        if self.cfg.pool(tier_pool).model == model:
            return tier_pool
        pool = self.models.get(model)
        if pool is None:
            raise NotFound(f"The model '{model}' does not exist. Served models: {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        return pool

    def _headers(self, request: web.Request, gen: Generation, started: float) -> dict[str, str]:
        worker = gen.worker
        return {
            "X-Request-Id": request["request_id"],
            "X-Fullpower-Backend": worker.id if worker else "",
            "X-Fullpower-Model": worker.model if worker else "",
        }

    async def _complete(self, request, gen: Generation, fmt: "_Formatter", started: float) -> web.Response:
        parts: list[str] = []
        finished: Finished | None = None
        async with contextlib.aclosing(gen.frames()) as frames:
            async for item in frames:
                if isinstance(item, Finished):
                    finished = item
                elif item is not None:
                    parts.append(item.text)
        body = fmt.complete("".join(parts), finished)
        return web.Response(body=_json.encode(body), content_type="application/json",
                            headers=self._headers(request, gen, started))

    async def _stream(self, request, gen: Generation, fmt: "_Formatter", include_usage: bool,
                      started: float) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        async with contextlib.aclosing(gen.frames()) as frames:
            try:
                async for item in frames:
                    if response is None:
                        # Headers go out with the first frame, so a worker lost before it is retried
                        # invisibly and the headers name the worker that served.
                        response = web.StreamResponse(headers={
                            **self._headers(request, gen, started), "Content-Type": "text/event-stream",
                            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                        await response.prepare(request)
                        await response.write(_sse(fmt.first_chunk(include_usage)))
                    if item is None:
                        await response.write(b": keep-alive\n\n")
                    elif isinstance(item, Finished):
                        out = [_sse(fmt.final_chunk(item.finish_reason, include_usage))]
                        if include_usage:
                            out.append(_sse(fmt.usage_chunk(item)))
                        out.append(b"data: [DONE]\n\n")
                        await response.write(b"".join(out))
                    elif item.text:
                        await response.write(_sse(fmt.delta_chunk(item.text, include_usage)))
            except ApiError as exc:
                if response is None:
                    raise
                # After the first byte the status is sent: report the error in-band, never hang.
                await response.write(b"data: " + exc.body() + b"\n\n")
        await response.write_eof()
        return response


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def _json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(obj), status=status, content_type="application/json")


class _Formatter:
    """Builds OpenAI's response objects for chat or text completions."""

    def __init__(self, kind: type, model: str, request_id: str) -> None:
        self.chat = kind is ChatCompletionRequest
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.model = model
        self.created = int(time.time())

    @staticmethod
    def usage(f: Finished | None) -> dict:
        p, c = (f.prompt_tokens, f.completion_tokens) if f else (0, 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def complete(self, text: str, f: Finished | None) -> dict:
        reason = f.finish_reason if f else "stop"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": [choice], "usage": self.usage(f)}

    def _chunk(self, choice: dict | None, include_usage: bool) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": None,
               "choices": [] if choice is None else [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def first_chunk(self, include_usage: bool) -> dict:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}, include_usage)
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": None}, include_usage)

    def delta_chunk(self, text: str, include_usage: bool) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._chunk(choice, include_usage)

    def final_chunk(self, reason: str, include_usage: bool) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        return self._chunk(choice, include_usage)

    def usage_chunk(self, f: Finished) -> dict:
        chunk = self._chunk(None, True)
        chunk["usage"] = self.usage(f)
        return chunk
