"""Planning (pure: no I/O, no clock): from an authenticated principal and a parsed OpenAI request
to a RequestPlan - tier, pool, sampling parameters, admission cost, timeouts and cache policy.

Both the HTTP handlers and the job runner plan through here, then hand the plan to the serving
core. Everything a plan decides is visible in one frozen object, so it is unit-tested without a
server (tests/test_plan.py).
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple

import cachetools
import msgspec

from backend.protocol import ChatMessage, Generate, SamplingParams
from proxy.config import Cache, Pool, Tier, Timeouts
from proxy.errors import InvalidRequest, NotFound
from proxy.serving.auth import Principal
from proxy.serving.cachekey import cache_key, shareable
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.serving.structured import TEXT, OutputShape, output_shape

CHARS_PER_TOKEN = 4  # the proxy has no tokenizer; admission estimates prompt tokens from length
# Repeated requests (Planner.plan_body): bodies up to this size are remembered, within this many
# bytes in all (an entry is charged twice its body - the plan holds the prompt's text again - plus
# the plan objects' own size).
REPEAT_MAX_BODY_BYTES = 16 * 1024
REPEAT_MEMORY_BYTES = 8 * 1024 * 1024
REPEAT_ENTRY_OVERHEAD = 2048


class RequestPlan(msgspec.Struct, frozen=True):
    """Everything a plan decides (a frozen msgspec Struct: made for every request, and a frozen
    dataclass's __init__ cost ~2% of the proxy's CPU per pass-through request)."""

    key: str  # the API key's name (never its secret)
    tier: str
    pool: str
    model: str  # as the client named it (echoed in responses)
    chat: bool
    params: SamplingParams
    messages: list[ChatMessage] | None
    prompt: str | None
    cost: int  # estimated tokens: prompt + max_tokens (admission and rate limits)
    stream: bool
    include_usage: bool
    first_token_s: float
    idle_s: float
    write_timeout_s: float  # a stream's client must take each write within this
    cache_key: str | None  # None: neither cached nor coalesced
    cache_read: bool
    cache_write: bool
    shape: OutputShape = TEXT  # text, JSON or tool calls (structured.py)
    tools: tuple = ()  # function definitions for the chat template, when the shape is tool calls
    n: int = 1  # choices asked for; plan_choices gives one plan per choice

    @property
    def plain(self) -> bool:
        """Plain text, one choice, no logprobs: the stream's fast path applies."""
        return self.shape.kind == "text" and self.n == 1 and self.params.logprobs < 0

    def generate(self, request_id: int, resume_token_ids: list[int]) -> Generate:
        return Generate(id=request_id, params=self.params, messages=self.messages, prompt=self.prompt,
                        resume_token_ids=resume_token_ids, tools=list(self.tools))


class _Planned(NamedTuple):
    """A plan and the live inputs it was made with (plan_body asks them again for a repeat)."""
    plan: RequestPlan
    own_pool: str  # the pool the request's tier and model lead to, before degradation's choice
    context: int | None  # the context length of plan.pool when planned


class _Remembered(NamedTuple):
    plans: list[RequestPlan]
    own_pool: str
    context: int | None
    size: int  # what the entry is charged against REPEAT_MEMORY_BYTES


class Planner:
    """Owns the sections of the config that shape a request: tiers, pools, cache policy, default
    output length and stream timeouts."""

    def __init__(self, tiers: list[Tier], pools: list[Pool], cache: Cache, timeouts: Timeouts,
                 max_tokens_default: int) -> None:
        self.reconfigure(tiers, pools, cache, timeouts, max_tokens_default)

    def reconfigure(self, tiers: list[Tier], pools: list[Pool], cache: Cache, timeouts: Timeouts,
                    max_tokens_default: int) -> None:
        self.tiers = {t.name: t for t in tiers}
        self.tier_rank = {t.name: i for i, t in enumerate(tiers)}  # config order: first = highest
        self.pools = {p.name: p for p in pools}
        self.cache = cache
        self.timeouts = timeouts
        self.max_tokens_default = max_tokens_default
        self._pool_for: dict[tuple, str] = {}  # (model, principal, tier) -> pool_for's answer
        # plans of repeated cacheable requests (plan_body); a reload forgets them all
        self._repeated = cachetools.LRUCache(REPEAT_MEMORY_BYTES, getsizeof=lambda entry: entry.size)

    def effective_tier(self, tier: str, requested: str | None) -> str:
        """X-Priority may lower a request's tier, never raise it."""
        if not requested:
            return tier
        requested = requested.strip()
        if requested not in self.tier_rank:
            raise InvalidRequest(f"Unknown X-Priority tier {requested!r}; tiers: {', '.join(self.tier_rank)}.",
                                 param="X-Priority")
        return requested if self.tier_rank[requested] >= self.tier_rank[tier] else tier

    def allowed_pools(self, principal: Principal, tier: str) -> list[str]:
        """The pool of the tier the request runs at, the pool of the caller's own tier (X-Priority
        and the jobs tier lower priority, not what a key may call), then the key's extra pools."""
        wanted = [self.tiers[tier].pool, self.tiers[principal.tier].pool, *principal.pools]
        return [p for p in dict.fromkeys(wanted) if p in self.pools]

    def models_for(self, principal: Principal) -> list[str]:
        return list(dict.fromkeys(self.pools[p].model for p in self.allowed_pools(principal, principal.tier)))

    def pool_for(self, model: str, principal: Principal, tier: str) -> str:
        """The first pool the caller may use that serves the model (its tier's pool first). A
        model the caller may not use is reported like one that does not exist."""
        found = self._pool_for.get((model, principal, tier))
        if found is not None:
            return found
        for pool in self.allowed_pools(principal, tier):
            if self.pools[pool].model == model:
                # remembered until a reload; bounded: only served models, configured keys and tiers
                self._pool_for[(model, principal, tier)] = pool
                return pool
        served = ", ".join(self.models_for(principal))
        raise NotFound(f"The model '{model[:200]}' does not exist or is not available to this API key. "
                       f"Available models: {served}.", param="model", code="model_not_found")

    def plan(self, principal: Principal, requested_tier: str | None,
             req: ChatCompletionRequest | CompletionRequest, cache_directives: frozenset[str] = frozenset(),
             choose_pool: Callable[[str, str], str] = lambda tier, pool: pool,
             context_of: Callable[[str], int | None] = lambda pool: None) -> RequestPlan:
        """`choose_pool(tier, pool)` may swap the pool (degradation reads live load; planning does not);
        `context_of(pool)` is the context length its ready workers report (None: none is ready)."""
        return self._plan(principal, requested_tier, req, cache_directives, choose_pool, context_of).plan

    def _plan(self, principal, requested_tier, req, cache_directives, choose_pool, context_of) -> "_Planned":
        tier = self.effective_tier(principal.tier, requested_tier)
        own_pool = self.pool_for(req.model, principal, tier)
        pool = choose_pool(tier, own_pool)
        pool_cfg = self.pools[pool]
        chat = isinstance(req, ChatCompletionRequest)
        messages = prompt = None
        shape, tools, logprobs = TEXT, (), -1
        if chat:
            messages = [self._message(i, m) for i, m in enumerate(req.messages)]
            prompt_chars = sum(len(m.content) for m in messages)
            shape = output_shape(req)
            if shape.tools:
                tools = tuple(t.as_dict() for t in req.tools)
                prompt_chars += sum(len(str(t)) for t in tools)
            if req.top_logprobs is not None and not req.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
            if req.logprobs:
                logprobs = req.top_logprobs or 0
        else:
            prompt = req.prompt_text()
            prompt_chars = len(prompt)
            if req.logprobs is not None:
                logprobs = req.logprobs
        if shape.grammar and req.stop:
            raise InvalidRequest("stop cannot be combined with a structured output (it would cut the JSON).",
                                 param="stop")
        prompt_estimate = prompt_chars // CHARS_PER_TOKEN + 1
        context = context_of(pool)
        max_tokens = self._output_limit(req, context, prompt_estimate)
        if req.min_tokens and req.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens}).",
                                 param="min_tokens")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=pool_cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=pool_cfg.default_top_p if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop_list(),
            ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.token_bias(), logprobs=logprobs, grammar=shape.grammar)
        tier_cfg = self.tiers[tier]
        return _Planned(RequestPlan(
            key=principal.key_name, tier=tier, pool=pool, model=req.model, chat=chat, params=params,
            messages=messages, prompt=prompt,
            # No request costs more than one sequence can hold: admission rests on the model's
            # context, not on what the client declared.
            cost=min(prompt_estimate + max_tokens, context or prompt_estimate + max_tokens),
            stream=bool(req.stream),
            include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
            first_token_s=tier_cfg.first_token_s or self.timeouts.first_token_s,
            idle_s=tier_cfg.idle_s or self.timeouts.idle_s, write_timeout_s=self.timeouts.stream_write_s,
            cache_key=self._cache_key(principal, pool_cfg, chat, params, messages, prompt, tools),
            cache_read="no-cache" not in cache_directives, cache_write="no-store" not in cache_directives,
            shape=shape, tools=tools, n=req.n or 1), own_pool, context)

    def plan_choices(self, principal: Principal, requested_tier: str | None,
                     req: ChatCompletionRequest | CompletionRequest, cache_directives: frozenset[str] = frozenset(),
                     choose_pool: Callable[[str, str], str] = lambda tier, pool: pool,
                     context_of: Callable[[str], int | None] = lambda pool: None) -> list[RequestPlan]:
        """One plan per choice (`n`): each is admitted, rate-limited and generated on its own. Sampled
        choices get consecutive seeds from the request's seed (or a random one), so they differ
        and a seeded request is reproducible; greedy choices are identical and may share one
        generation (coalescing)."""
        return self._plan_choices(principal, requested_tier, req, cache_directives, choose_pool, context_of)[0]

    def _plan_choices(self, principal, requested_tier, req, cache_directives, choose_pool,
                      context_of) -> tuple[list[RequestPlan], "_Planned"]:
        planned = self._plan(principal, requested_tier, req, cache_directives, choose_pool, context_of)
        first = planned.plan
        if first.n == 1:
            return [first], planned
        if first.params.temperature == 0:
            return [first] * first.n, planned
        base = first.params.seed if first.params.seed is not None else random.getrandbits(62)
        plans = []
        for i in range(first.n):
            params = msgspec.structs.replace(first.params, seed=(base + i) % 2**63)
            plans.append(msgspec.structs.replace(first, params=params, cache_key=self._cache_key(
                principal, self.pools[first.pool], first.chat, params, first.messages, first.prompt, first.tools)))
        return plans, planned

    def plan_body(self, principal: Principal, requested_tier: str | None, cache_control: str, body: bytes,
                  kind: type, choose_pool: Callable[[str, str], str] = lambda tier, pool: pool,
                  context_of: Callable[[str], int | None] = lambda pool: None,
                  parsed: Callable[[str], None] = lambda model: None) -> list[RequestPlan]:
        """plan_choices for a raw request body: parse and plan it - or, for a cacheable request
        seen before byte for byte (same key, X-Priority and Cache-Control too), take the plans made
        then, once the live inputs of planning (the pool degradation chooses, the context length
        its workers report) are asked again and still agree; `parsed(model)` is told the model the
        body names once it parsed (before planning can refuse it). Parsing and planning are most of the
        proxy's own work for a cache hit; a repeat of a cacheable request is what hits are."""
        key = (kind, principal, requested_tier, cache_control, body)
        remembered = self._repeated.get(key)
        if remembered is not None:
            first = remembered.plans[0]
            pool = choose_pool(first.tier, remembered.own_pool)  # asked once per request, as planning does
            if pool == first.pool and context_of(pool) == remembered.context:
                parsed(first.model)
                return list(remembered.plans)
            live_choice = choose_pool
            choose_pool = lambda tier, own: pool if own == remembered.own_pool else live_choice(tier, own)  # noqa: E731
        req = parse(body, kind)
        parsed(req.model)
        plans, planned = self._plan_choices(principal, requested_tier, req, cache_directives(cache_control or ""),
                                            choose_pool, context_of)
        first = plans[0]
        # Only cacheable requests are remembered (their repeats are what the cache answers), and
        # only plans a repeat may reuse: one choice, or greedy choices (sampled ones draw seeds).
        if (first.cache_key is not None and (first.n == 1 or first.params.temperature == 0)
                and len(body) <= REPEAT_MAX_BODY_BYTES):
            self._repeated[key] = _Remembered(plans, planned.own_pool, planned.context,
                                              2 * len(body) + REPEAT_ENTRY_OVERHEAD)
        return plans

    @staticmethod
    def _message(index: int, m) -> ChatMessage:
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequest("A tool message needs tool_call_id.", param=f"messages[{index}].tool_call_id")
        return m.to_protocol(index)

    def _cache_key(self, principal: Principal, pool_cfg: Pool, chat: bool, params: SamplingParams,
                   messages, prompt, tools) -> str | None:
        c = self.cache
        # logprobs are not kept with cached answers: such requests are neither cached nor shared
        if not c.enabled or params.logprobs >= 0 or not shareable(params, c.include_sampled):
            return None
        scope = principal.key_name if c.scope == "key" else "shared"
        return cache_key(scope, pool_cfg.model, "chat" if chat else "text", params, messages, prompt, tools)

    def _output_limit(self, req, context: int | None, prompt_estimate: int) -> int:
        """The request's max_tokens, refused when it alone exceeds the model's context (the prompt
        is only estimated here; the worker checks prompt + max_tokens exactly); the default is
        clamped to what the context leaves after the estimated prompt."""
        requested = req.output_limit()
        if requested is None:
            default = self.max_tokens_default
            return default if context is None else max(1, min(default, context - prompt_estimate))
        if context is not None and requested >= context:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise InvalidRequest(f"{param} is {requested}, but this model's maximum context length is {context} "
                                 "tokens (prompt and completion together).", param=param,
                                 code="context_length_exceeded")
        return requested


def cache_directives(header: str) -> frozenset[str]:
    """The Cache-Control request directives we honour (no-cache, no-store), lower-cased."""
    return frozenset(d.strip().lower() for d in header.split(",") if d.strip())

