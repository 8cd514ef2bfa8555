from backend.protocol import ChatMessage, SamplingParams
from proxy.serving.cachekey import cache_key, shareable

MSGS = [ChatMessage("user", "hi")]


def key(params=SamplingParams(temperature=0.0, max_tokens=10), scope="shared", model="m", messages=MSGS, prompt=None):
    return cache_key(scope, model, "chat" if messages else "text", params, messages, prompt)


def test_only_deterministic_requests_are_shareable_by_default():
    assert shareable(SamplingParams(temperature=0.0), False)
    assert shareable(SamplingParams(temperature=0.8, seed=3), False)
    assert not shareable(SamplingParams(temperature=0.8), False)
    assert shareable(SamplingParams(temperature=0.8), True)


def test_every_output_changing_parameter_splits_the_key():
    base = key()
    variants = [
        key(SamplingParams(temperature=0.0, max_tokens=11)),
        key(SamplingParams(temperature=0.0, max_tokens=10, stop=["x"])),
        key(SamplingParams(temperature=0.5, max_tokens=10, seed=1)),
        key(model="other"),
        key(scope="key-a"),
        key(messages=[ChatMessage("user", "hi!")]),
        key(messages=[ChatMessage("system", "hi")]),
        key(messages=None, prompt="hi"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert key(SamplingParams(temperature=0.5, max_tokens=10, seed=1)) != key(
        SamplingParams(temperature=0.5, max_tokens=10, seed=2))
    assert key(SamplingParams(temperature=0.5, max_tokens=10, seed=1, top_p=0.9)) != key(
        SamplingParams(temperature=0.5, max_tokens=10, seed=1, top_p=0.8))


def test_greedy_ignores_sampling_knobs():
    assert key(SamplingParams(temperature=0.0, max_tokens=10, top_p=0.3, seed=9)) == key()
