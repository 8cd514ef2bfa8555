"""OpenAI endpoints. Handlers stay thin: parse once, authenticate, rate-limit, admit, run the
generation, format the answer (JSON, or server-sent events exactly as OpenAI sends them)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import msgspec
from aiohttp import web

from backend.protocol import ChatMessage, Finished, Generate, SamplingParams
from proxy.auth import Authenticator
from proxy.config import Config
from proxy.errors import (ApiError, InvalidRequest, NotFound, Overloaded, PayloadTooLarge, RequestTimeout,
                          UnsupportedMediaType)
from proxy.gate import Gate
from proxy.generation import Generation, RetryBudget
from proxy.metrics import Metrics
from proxy.observe import RequestRecord
from proxy.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.pool import PoolState
from proxy.ratelimit import KeyLimits

_json = msgspec.json.Encoder()
CHARS_PER_TOKEN = 4  # the proxy has no tokenizer; admission estimates prompt tokens from length


class OpenAIApi:
    def __init__(self, cfg: Config, pools: PoolState, gate: Gate, metrics: Metrics, budget: RetryBudget) -> None:
        self.pools = pools
        self.gate = gate
        self.metrics = metrics
        self.budget = budget
        self.created = int(time.time())
        self.key_limits: dict[str, KeyLimits] = {}
        self.update(cfg)

    def update(self, cfg: Config) -> None:
        """Take a (re)loaded config. Requests in flight keep what they started with."""
        self.cfg = cfg
        self.auth = Authenticator(cfg)
        models: dict[str, str] = {}  # served model name -> first pool serving it
        for pool in cfg.pools:
            models.setdefault(pool.model, pool.name)
        self.models = models
        self.tier_rank = {t.name: i for i, t in enumerate(cfg.tiers)}  # config order: first = highest
        old = self.key_limits
        self.key_limits = {}
        for k in cfg.auth.keys:
            if k.requests_per_second or k.tokens_per_minute:
                kept = old.get(k.name)
                same = kept is not None and kept.settings == (k.requests_per_second, k.tokens_per_minute)
                self.key_limits[k.name] = kept if same else KeyLimits(k.requests_per_second, k.tokens_per_minute,
                                                                      time.monotonic)

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
        rec: RequestRecord = request["record"]
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        rec.key = principal.key_name
        rec.tier = tier = self._effective_tier(principal.tier, request.headers.get("X-Priority"))
        req = parse(await self._read_body(request), kind)
        rec.model = req.model
        pool = self._pool_for(req.model, tier)
        pool_cfg = self.cfg.pool(pool)
        params = SamplingParams(
            max_tokens=req.output_limit() or self.cfg.limits.max_tokens_default,
            temperature=pool_cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=pool_cfg.default_top_p if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop_list())
        if kind is ChatCompletionRequest:
            messages = [ChatMessage(m.role, m.text(i)) for i, m in enumerate(req.messages)]
            prompt_chars = sum(len(m.content) for m in messages)

            def make(rid: int, resume: list[int]) -> Generate:
                return Generate(id=rid, params=params, messages=messages, resume_token_ids=resume)
        else:
            prompt = req.prompt_text()
            prompt_chars = len(prompt)

            def make(rid: int, resume: list[int]) -> Generate:
                return Generate(id=rid, params=params, prompt=prompt, resume_token_ids=resume)

        cost = prompt_chars // CHARS_PER_TOKEN + 1 + params.max_tokens
        limits = self.key_limits.get(principal.key_name)
        if limits is not None:
            wait = limits.admit(cost)
            if wait:
                self.metrics.rate_limited.labels(tier, "key").inc()
                raise Overloaded("Rate limit reached for this API key; retry after the indicated time.",
                                 code="rate_limit_exceeded", retry_after=wait)
        tier_cfg = self.cfg.tier(tier)
        t = self.cfg.timeouts
        gen = Generation(self.pools, pool, make, cost, first_token_s=tier_cfg.first_token_s or t.first_token_s,
                         idle_s=tier_cfg.idle_s or t.idle_s, keepalive_s=t.keepalive_comment_s,
                         budget=self.budget, max_attempts=self.cfg.routing.max_attempts, metrics=self.metrics)
        try:
            ticket = await self.gate.acquire(pool, tier, principal.key_name, cost)
        except asyncio.CancelledError:
            self.metrics.cancellations.labels("queued").inc()
            raise
        rec.queue_s = ticket.queued_s
        try:
            fmt = _Formatter(kind, req.model)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return await self._stream(request, rec, gen, fmt, include_usage)
            return await self._complete(request, rec, gen, fmt)
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.cancellations.labels("generating").inc()
            raise
        finally:
            self.gate.release(ticket)
            rec.failovers = gen.failovers
            if limits is not None:
                limits.refund(cost - (rec.prompt_tokens + rec.completion_tokens))

    def _effective_tier(self, tier: str, requested: str | None) -> str:
        """X-Priority may lower a request's tier, never raise it."""
        if not requested:
            return tier
        requested = requested.strip()
        if requested not in self.tier_rank:
            raise InvalidRequest(f"Unknown X-Priority tier {requested!r}; tiers: {', '.join(self.tier_rank)}.",
                                 param="X-Priority")
        return requested if self.tier_rank[requested] >= self.tier_rank[tier] else tier

    async def _read_body(self, request: web.Request) -> bytes:
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json.")
        limit = self.cfg.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.")
        try:
            async with asyncio.timeout(self.cfg.limits.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.") from None
        except TimeoutError:
            raise RequestTimeout("The request body did not arrive in time.") from None

    def _pool_for(self, model: str, tier: str) -> str:
        tier_pool = self.cfg.tier(tier).pool
        if self.cfg.pool(tier_pool).model == model:
            return tier_pool
        pool = self.models.get(model)
        if pool is None:
            raise NotFound(f"The model '{model}' does not exist. Served models: {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        return pool

    def _headers(self, request: web.Request, rec: RequestRecord, gen: Generation) -> dict[str, str]:
        worker = gen.worker
        rec.worker = worker.id if worker else None
        rec.served_model = worker.model if worker else None
        dispatched = gen.dispatched_at or time.monotonic()
        # Time in the proxy: before dispatch (less the queue wait) and after the last frame.
        rec.overhead_s = max(0.0, (dispatched - rec.started) - (rec.queue_s or 0.0))
        return {
            "X-Request-Id": rec.id,
            "X-Fullpower-Backend": rec.worker or "",
            "X-Fullpower-Model": rec.served_model or "",
            "X-Fullpower-Overhead-Ms": f"{rec.overhead_s * 1000:.3f}",
        }

    async def _complete(self, request, rec: RequestRecord, gen: Generation, fmt: "_Formatter") -> web.Response:
        parts: list[str] = []
        finished: Finished | None = None
        async with contextlib.aclosing(gen.frames()) as frames:
            async for item in frames:
                if isinstance(item, Finished):
                    finished = item
                elif item is not None:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.monotonic() - rec.started
                    parts.append(item.text)
        finished_at = time.monotonic()
        rec.prompt_tokens, rec.completion_tokens = finished.prompt_tokens, finished.completion_tokens
        body = _json.encode(fmt.complete("".join(parts), finished))
        headers = self._headers(request, rec, gen)
        rec.overhead_s += time.monotonic() - finished_at
        headers["X-Fullpower-Overhead-Ms"] = f"{rec.overhead_s * 1000:.3f}"
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _stream(self, request, rec: RequestRecord, gen: Generation, fmt: "_Formatter",
                      include_usage: bool) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        inter_token = self.metrics.inter_token.labels(rec.tier)
        last = None
        async with contextlib.aclosing(gen.frames()) as frames:
            try:
                async for item in frames:
                    if response is None:
                        # Headers go out with the first frame, so a worker lost before it is retried
                        # invisibly and the headers name the worker that served.
                        rec.ttft_s = time.monotonic() - rec.started
                        response = web.StreamResponse(headers={
                            **self._headers(request, rec, gen), "Content-Type": "text/event-stream",
                            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                        await response.prepare(request)
                        await response.write(_sse(fmt.first_chunk(include_usage)))
                    if item is None:
                        await response.write(b": keep-alive\n\n")
                        continue
                    now = time.monotonic()
                    if last is not None:
                        inter_token.observe(now - last)
                    last = now
                    if isinstance(item, Finished):
                        rec.prompt_tokens, rec.completion_tokens = item.prompt_tokens, item.completion_tokens
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
                rec.fail(exc)
                await response.write(b"data: " + exc.body() + b"\n\n")
        await response.write_eof()
        return response


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def _json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(obj), status=status, content_type="application/json")


class _Formatter:
    """Builds OpenAI's response objects for chat or text completions."""

    def __init__(self, kind: type, model: str) -> None:
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
