"""Planner (pure): from a principal and a parsed request to a RequestPlan."""

import msgspec
import pytest

from proxy.config import Cache, Pool, Tier, Timeouts
from proxy.errors import InvalidRequest, NotFound
from proxy.serving.auth import Principal
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.serving.plan import CHARS_PER_TOKEN, Planner, cache_directives

TIERS = [Tier(name="premium", pool="big", weight=6, first_token_s=5.0),
         Tier(name="standard", pool="big", weight=3),
         Tier(name="batch", pool="small", weight=1, idle_s=7.0)]
POOLS = [Pool(name="big", model="big-model", default_temperature=0.0),
         Pool(name="small", model="small-model", default_temperature=0.7, default_top_p=0.9)]


def planner(**cache):
    return Planner(TIERS, POOLS, Cache(**cache), Timeouts(first_token_s=100.0, idle_s=50.0), max_tokens_default=64)


def chat(**fields):
    body = {"model": "big-model", "messages": [{"role": "user", "content": "x" * 40}], **fields}
    return parse(msgspec.json.encode(body), ChatCompletionRequest)


def test_plan_takes_tier_pool_params_cost_and_timeouts():
    plan = planner().plan(Principal("alice", "premium"), None, chat(max_tokens=10, stream=True,
                                                                    stream_options={"include_usage": True}))
    assert (plan.key, plan.tier, plan.pool, plan.model, plan.chat) == ("alice", "premium", "big", "big-model", True)
    assert plan.params.max_tokens == 10 and plan.params.temperature == 0.0  # the pool's default temperature
    assert plan.cost == 40 // CHARS_PER_TOKEN + 1 + 10
    assert plan.stream and plan.include_usage
    assert (plan.first_token_s, plan.idle_s) == (5.0, 50.0)  # the tier's own, else the global one


def test_default_max_tokens_and_text_completions():
    req = parse(msgspec.json.encode({"model": "small-model", "prompt": "hello"}), CompletionRequest)
    plan = planner().plan(Principal("bob", "batch"), None, req)
    assert not plan.chat and plan.prompt == "hello" and plan.messages is None
    assert plan.params.max_tokens == 64 and (plan.params.temperature, plan.params.top_p) == (0.7, 0.9)
    assert plan.idle_s == 7.0 and not plan.include_usage


def test_x_priority_lowers_but_never_raises_the_tier():
    p = planner()
    assert p.plan(Principal("a", "premium"), "batch", chat()).tier == "batch"
    assert p.plan(Principal("a", "batch"), "premium", chat(model="small-model")).tier == "batch"
    with pytest.raises(InvalidRequest) as exc:
        p.plan(Principal("a", "premium"), "gold", chat())
    assert exc.value.param == "X-Priority"


def test_a_model_outside_the_tiers_pool_needs_the_key_to_be_allowed_that_pool():
    p = planner()
    allowed = Principal("a", "premium", pools=("small",))
    assert p.plan(allowed, None, chat(model="small-model")).pool == "small"
    assert p.models_for(allowed) == ["big-model", "small-model"]
    with pytest.raises(NotFound) as exc:
        p.plan(Principal("b", "premium"), None, chat(model="small-model"))  # its tier's pool is "big"
    assert exc.value.code == "model_not_found"
    assert p.models_for(Principal("b", "premium")) == ["big-model"]
    with pytest.raises(NotFound):
        p.plan(allowed, None, chat(model="nope"))


def test_choose_pool_callback_swaps_the_pool_and_the_cache_key_follows():
    p = planner()
    normal = p.plan(Principal("a", "standard"), None, chat(temperature=0))
    degraded = p.plan(Principal("a", "standard"), None, chat(temperature=0),
                      choose_pool=lambda tier, pool: "small")
    assert degraded.pool == "small"
    assert normal.cache_key and degraded.cache_key and normal.cache_key != degraded.cache_key


def test_cache_policy():
    p = planner()
    greedy = p.plan(Principal("a", "standard"), None, chat(temperature=0))
    assert greedy.cache_key and greedy.cache_read and greedy.cache_write
    assert p.plan(Principal("a", "standard"), None, chat(temperature=0.8)).cache_key is None  # sampled
    assert p.plan(Principal("a", "standard"), None, chat(temperature=0.8, seed=1)).cache_key  # seeded
    off = p.plan(Principal("a", "standard"), None, chat(temperature=0), cache_directives("No-Cache, no-store"))
    assert not off.cache_read and not off.cache_write
    assert planner(enabled=False).plan(Principal("a", "standard"), None, chat(temperature=0)).cache_key is None
    # per-key scope (the default): two keys never share an entry; shared scope (opt-in): they do
    other = p.plan(Principal("b", "standard"), None, chat(temperature=0))
    assert other.cache_key != greedy.cache_key
    shared = planner(scope="shared")
    assert (shared.plan(Principal("a", "standard"), None, chat(temperature=0)).cache_key
            == shared.plan(Principal("b", "standard"), None, chat(temperature=0)).cache_key)


def test_generate_frame_carries_the_plan_and_resume_ids():
    plan = planner().plan(Principal("a", "standard"), None, chat(max_tokens=3))
    frame = plan.generate(7, [1, 2])
    assert frame.id == 7 and frame.resume_token_ids == [1, 2] and frame.params is plan.params
    assert frame.messages[0].content == "x" * 40


def test_max_tokens_is_refused_or_clamped_against_the_models_context():
    p = planner()
    with pytest.raises(InvalidRequest) as exc:
        p.plan(Principal("a", "standard"), None, chat(max_tokens=1_000_000), context_of=lambda pool: 4096)
    assert exc.value.param == "max_tokens" and exc.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest) as exc:
        p.plan(Principal("a", "standard"), None, chat(max_completion_tokens=4096), context_of=lambda pool: 4096)
    assert exc.value.param == "max_completion_tokens"
    fits = p.plan(Principal("a", "standard"), None, chat(max_tokens=4090), context_of=lambda pool: 4096)
    assert fits.params.max_tokens == 4090 and fits.cost == 4096  # the cost never exceeds the context
    small = p.plan(Principal("a", "standard"), None, chat(), context_of=lambda pool: 40)
    assert small.params.max_tokens == 40 - (40 // CHARS_PER_TOKEN + 1)  # the default, clamped
    assert p.plan(Principal("a", "standard"), None, chat()).params.max_tokens == 64  # no worker ready yet


def body(**fields) -> bytes:
    return msgspec.json.encode({"model": "big-model", "messages": [{"role": "user", "content": "x" * 40}],
                                **fields})


def test_a_repeated_cacheable_body_reuses_its_plans_while_the_live_inputs_agree():
    p = planner()
    who = Principal("a", "standard")
    seen = []
    greedy = body(temperature=0)
    first = p.plan_body(who, None, "", greedy, ChatCompletionRequest, parsed=seen.append)
    again = p.plan_body(who, None, "", greedy, ChatCompletionRequest, parsed=seen.append)
    assert again[0] is first[0]  # remembered, not planned again
    assert seen == ["big-model", "big-model"]  # the record learns the model either way
    # what the repeat is keyed on: another key, X-Priority or Cache-Control is planned on its own
    assert p.plan_body(Principal("b", "standard"), None, "", greedy, ChatCompletionRequest)[0] is not first[0]
    batch = p.plan_body(who, "batch", "", greedy, ChatCompletionRequest)[0]
    assert batch.tier == "batch"
    no_store = p.plan_body(who, None, "no-store", greedy, ChatCompletionRequest)[0]
    assert not no_store.cache_write and first[0].cache_write
    # live inputs asked again: degradation's choice of pool and the workers' context length
    degraded = p.plan_body(who, None, "", greedy, ChatCompletionRequest, choose_pool=lambda tier, pool: "small")[0]
    assert degraded.pool == "small" and degraded.cache_key != first[0].cache_key
    assert degraded.params.temperature == 0  # the request's own temperature, planned for the new pool
    long_context = p.plan_body(who, None, "", greedy, ChatCompletionRequest, context_of=lambda pool: 30)[0]
    assert long_context.params.max_tokens == 30 - (40 // CHARS_PER_TOKEN + 1)  # the default, clamped anew
    assert p.plan_body(who, None, "", greedy, ChatCompletionRequest, context_of=lambda pool: 30)[0] is long_context
    # a reload forgets every remembered plan
    p.reconfigure(TIERS, POOLS, Cache(), Timeouts(first_token_s=1.0, idle_s=2.0), max_tokens_default=64)
    reloaded = p.plan_body(who, None, "", greedy, ChatCompletionRequest)[0]
    assert reloaded is not first[0] and reloaded.first_token_s == 1.0


def test_only_repeatable_cacheable_plans_are_remembered_and_the_memory_is_bounded():
    from proxy.serving import plan as plan_module

    p = planner()
    who = Principal("a", "standard")

    def remembered(raw: bytes) -> bool:
        return (p.plan_body(who, None, "", raw, ChatCompletionRequest)[0]
                is p.plan_body(who, None, "", raw, ChatCompletionRequest)[0])

    assert not remembered(body(temperature=0.8))  # sampled: never cached, so never remembered
    sampled_choices = body(temperature=0.8, seed=None, n=2)
    assert not remembered(sampled_choices)
    assert remembered(body(temperature=0, n=2))  # greedy choices are all the same plan
    big = body(temperature=0, messages=[{"role": "user", "content": "y" * plan_module.REPEAT_MAX_BODY_BYTES}])
    assert not remembered(big)
    for i in range(3000):  # far more than fit: the remembered bytes stay within the bound
        p.plan_body(who, None, "", body(temperature=0, messages=[{"role": "user", "content": f"{i:04d}" * 500}]),
                    ChatCompletionRequest)
    assert p._repeated.currsize <= plan_module.REPEAT_MEMORY_BYTES
    assert len(p._repeated) < 3000
    # a body that does not parse is refused every time, and never remembered
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            p.plan_body(who, None, "", b"{not json", ChatCompletionRequest)
