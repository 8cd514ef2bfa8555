"""End to end: the official openai client against `fullpower serve` running the real embedded model."""

import pytest
from openai import OpenAI


@pytest.fixture
def client(embedded_server):
    return OpenAI(base_url=embedded_server.url + "/v1", api_key="any-key-works-here", max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_capital_of_france_non_streaming(client):
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_capital_of_france_streaming_with_usage(client):
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3  # token by token, not one blob
    assert "Paris" in "".join(deltas)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(deltas)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]


def test_default_sampling_still_answers(client):
    # No temperature: the pool's default (0.2 / top_p 0.9, as SmolLM2's card recommends) applies.
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=30)
    assert r.choices[0].message.content.strip()


def test_completions_and_models(client):
    r = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=5,
                                  temperature=0)
    assert "Paris" in r.choices[0].text
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
