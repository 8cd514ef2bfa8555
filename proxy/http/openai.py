"""OpenAI endpoints. Handlers stay thin: parse once, authenticate, rate-limit, admit, run the
generation, format the answer (JSON, or server-sent events exactly as OpenAI sends them)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from aiohttp import web

from backend.protocol import ChatMessage, Finished, Generate, SamplingParams, Tokens
from proxy.serving.auth import Authenticator
from proxy.serving.cache import AnswerCache, CachedAnswer
from proxy.serving.cachekey import cache_key, shareable
from proxy.serving.coalesce import Coalescer, Flight
from proxy.serving.degrade import Degrader, Load
from proxy.config import Config
from proxy.errors import (ApiError, InvalidRequest, NotFound, Overloaded, PayloadTooLarge, RequestTimeout,
                          UnsupportedMediaType)
from proxy.serving.gate import Gate
from proxy.serving.generation import Generation, RetryBudget
from proxy.metrics import Metrics
from proxy.serving.record import RequestRecord, new_request_id
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.fleet.pool import PoolState
from proxy.serving.ratelimit import KeyLimits

_json = msgspec.json.Encoder()
CHARS_PER_TOKEN = 4  # the proxy has no tokenizer; admission estimates prompt tokens from length


class OpenAIApi:
    def __init__(self, cfg: Config, pools: PoolState, gate: Gate, metrics: Metrics, budget: RetryBudget,
                 cache: AnswerCache) -> None:
        self.pools = pools
        self.cache = cache
        self.coalescer = Coalescer()
        self._background: set[asyncio.Task] = set()
        self.degraders: dict[str, Degrader] = {}
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
        self.degraders = {t.name: Degrader(t.fallback.queue_depth, t.fallback.utilization, t.fallback.expected_wait_s,
                                           t.fallback.recover_ratio) for t in cfg.tiers if t.fallback is not None}
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
        pool = self._degrade(tier, pool, rec)
        pool_cfg = self.cfg.pool(pool)
        params = SamplingParams(
            max_tokens=req.output_limit() or self.cfg.limits.max_tokens_default,
            temperature=pool_cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=pool_cfg.default_top_p if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop_list())
        messages = prompt = None
        if kind is ChatCompletionRequest:
            messages = [ChatMessage(m.role, m.text(i)) for i, m in enumerate(req.messages)]
            prompt_chars = sum(len(m.content) for m in messages)
        else:
            prompt = req.prompt_text()
            prompt_chars = len(prompt)

        def make(rid: int, resume: list[int]) -> Generate:
            return Generate(id=rid, params=params, messages=messages, prompt=prompt, resume_token_ids=resume)

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
        fmt = _Formatter(kind, req.model)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        c = self.cfg.cache
        directives = {d.strip().lower() for d in request.headers.get("Cache-Control", "").split(",")}
        key = None
        if c.enabled and shareable(params, c.include_sampled):
            scope = principal.key_name if c.scope == "key" else "shared"
            key = cache_key(scope, pool_cfg.model, "chat" if messages is not None else "text", params, messages, prompt)
        try:
            if key is None:
                source = await self._direct(rec, gen, pool, tier, principal.key_name, cost)
            else:
                source = await self._shared(rec, gen, pool, tier, principal.key_name, cost, key,
                                            read="no-cache" not in directives, store="no-store" not in directives)
            rec.cache = source.cache
            self.metrics.child(self.metrics.cache_requests, source.cache).inc()
            try:
                if req.stream:
                    return await self._stream(request, rec, source, fmt, include_usage)
                return await self._complete(request, rec, source, fmt)
            finally:
                source.close()
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.cancellations.labels("generating" if gen.dispatched_at else "queued").inc()
            raise
        finally:
            rec.failovers = gen.failovers
            if limits is not None:
                limits.refund(cost - (rec.prompt_tokens + rec.completion_tokens))

    async def _direct(self, rec, gen: Generation, pool: str, tier: str, key_name: str, cost: int) -> "_Source":
        ticket = await self.gate.acquire(pool, tier, key_name, cost)
        rec.queue_s = ticket.queued_s
        return _Source("bypass", gen.frames(), lambda: _served_by(gen.worker, gen.dispatched_at),
                       on_close=lambda: self.gate.release(ticket))

    async def _shared(self, rec, gen: Generation, pool: str, tier: str, key_name: str, cost: int, key: str,
                      read: bool, store: bool) -> "_Source":
        if read:
            answer = await self.cache.get(key)
            if answer is not None:
                return _Source("hit", _replay(answer), lambda: (answer.worker, answer.model, None))
            flight = self.coalescer.get(key) if self.cfg.cache.coalesce else None
            if flight is not None:
                self.coalescer.join(flight)
                return _Source("coalesced", flight.follow(self.cfg.timeouts.keepalive_comment_s),
                               lambda: _served_by(flight.worker, flight.dispatched_at),
                               on_close=lambda: self.coalescer.leave(flight))

        async def run(flight: Flight) -> None:
            ticket = await self.gate.acquire(pool, tier, key_name, cost)
            flight.queued_s = ticket.queued_s
            text: list[str] = []
            try:
                async with contextlib.aclosing(gen.frames()) as frames:
                    async for item in frames:
                        if item is None:
                            continue  # each waiter sends its own keepalives
                        flight.worker, flight.dispatched_at = gen.worker, gen.dispatched_at
                        if isinstance(item, Finished):
                            if store:
                                self._store(key, CachedAnswer(text, item.finish_reason, item.prompt_tokens,
                                                              item.completion_tokens, gen.worker.model, gen.worker.id))
                        elif item.text:
                            text.append(item.text)
                        flight.publish(item)
            finally:
                self.gate.release(ticket)

        flight = self.coalescer.start(key, run)
        self.coalescer.join(flight)

        def info():
            rec.queue_s = flight.queued_s
            return _served_by(flight.worker, flight.dispatched_at)
        return _Source("miss", flight.follow(self.cfg.timeouts.keepalive_comment_s), info,
                       on_close=lambda: self.coalescer.leave(flight))

    def _store(self, key: str, answer: CachedAnswer) -> None:
        task = asyncio.create_task(self.cache.put(key, answer))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _degrade(self, tier: str, pool: str, rec: RequestRecord) -> str:
        """The tier's fallback pool while its own pool is saturated (with hysteresis)."""
        fallback = self.cfg.tier(tier).fallback
        degrader = self.degraders.get(tier)
        if fallback is None or degrader is None or pool != self.cfg.tier(tier).pool:
            return pool
        admission = self.gate.admissions[pool]
        utilization = admission.active / admission.capacity if admission.capacity else 1.0
        if degrader.update(Load(admission.queued(), utilization, self.gate.expected_wait_s(pool))):
            self.metrics.degraded.labels(tier, fallback.pool).inc()
            return fallback.pool
        return pool

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
            if request.content.is_eof():  # the whole body came with the head: no timer needed
                return await request.read()
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

    def _headers(self, rec: RequestRecord, source: "_Source") -> dict[str, str]:
        rec.worker, rec.served_model, dispatched = source.info()
        # Time in the proxy: before dispatch (less the queue wait) and after the last frame.
        dispatched = dispatched or time.monotonic()
        rec.overhead_s = max(0.0, (dispatched - rec.started) - (rec.queue_s or 0.0))
        if source.cache in ("hit", "coalesced"):
            rec.overhead_s = time.monotonic() - rec.started
        return {
            "X-Request-Id": rec.id,
            "X-Fullpower-Backend": rec.worker or "",
            "X-Fullpower-Model": rec.served_model or "",
            "X-Fullpower-Cache": source.cache,
            "X-Fullpower-Overhead-Ms": f"{rec.overhead_s * 1000:.3f}",
        }

    async def _complete(self, request, rec: RequestRecord, source: "_Source", fmt: "_Formatter") -> web.Response:
        parts: list[str] = []
        finished: Finished | None = None
        async with contextlib.aclosing(source.frames) as frames:
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
        headers = self._headers(rec, source)
        if source.cache not in ("hit", "coalesced"):
            rec.overhead_s += time.monotonic() - finished_at
        headers["X-Fullpower-Overhead-Ms"] = f"{rec.overhead_s * 1000:.3f}"
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _stream(self, request, rec: RequestRecord, source: "_Source", fmt: "_Formatter",
                      include_usage: bool) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        inter_token = self.metrics.child(self.metrics.inter_token, rec.tier)
        last = None
        async with contextlib.aclosing(source.frames) as frames:
            try:
                async for item in frames:
                    if response is None:
                        # Headers go out with the first frame, so a worker lost before it is retried
                        # invisibly and the headers name the worker that served.
                        rec.ttft_s = time.monotonic() - rec.started
                        response = web.StreamResponse(headers={
                            **self._headers(rec, source), "Content-Type": "text/event-stream",
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


class _Source:
    """Where a response's frames come from (a generation, a shared flight, the cache), what the
    X-Fullpower-Cache header says about it, and who served it."""

    __slots__ = ("cache", "frames", "info", "_on_close")

    def __init__(self, cache: str, frames, info, on_close=None) -> None:
        self.cache = cache
        self.frames = frames
        self.info = info  # () -> (worker id, model, time the generation was dispatched or None)
        self._on_close = on_close

    def close(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


def _served_by(worker, dispatched_at):
    return (worker.id, worker.model, dispatched_at) if worker is not None else (None, None, dispatched_at)


async def _replay(answer: CachedAnswer):
    """A cached answer as frames, at once (no artificial delays), in the pieces it first came in."""
    for piece in answer.pieces:
        yield Tokens(id=0, token_ids=[], text=piece)
    yield Finished(id=0, finish_reason=answer.finish_reason, prompt_tokens=answer.prompt_tokens,
                   completion_tokens=answer.completion_tokens)


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def _json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(obj), status=status, content_type="application/json")


class _Formatter:
    """Builds OpenAI's response objects for chat or text completions."""

    def __init__(self, kind: type, model: str) -> None:
        self.chat = kind is ChatCompletionRequest
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + new_request_id()
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
