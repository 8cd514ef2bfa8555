"""The official openai client against fake workers: every supported parameter, and error objects."""

import openai
import pytest
from openai import OpenAI

from tests.conftest import fake_config

MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import Server

    config = fake_config(fake={"token_latency_ms": 0, "output_tokens": 30})
    config["auth"]["keys"][2]["requests_per_second"] = 0.01  # batch key: one request, then 429
    s = Server(config, tmp_path_factory.mktemp("openai")).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="sk-test-premium", max_retries=0)


def test_chat_parameters(client):
    r = client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=5, temperature=0, top_p=0.5,
                                       seed=42, user="user-1", n=1)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r2 = client.chat.completions.create(model="fake-model", messages=MSG, max_completion_tokens=5, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content
    seeded = [client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=8, temperature=1.0,
                                             seed=s).choices[0].message.content for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]


def test_stop_string_and_list(client):
    full = client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=20, temperature=0)
    words = full.choices[0].message.content.split()
    stop_word = words[5]
    cut = full.choices[0].message.content.index(" " + stop_word)
    for stop in (" " + stop_word, [" " + stop_word, "zzz-never"]):
        r = client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=20, temperature=0, stop=stop)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == full.choices[0].message.content[:cut]


def test_streaming_with_usage_and_completions(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 6
    assert chunks[-1].usage.completion_tokens == 6
    r = client.completions.create(model="fake-model", prompt="once upon", max_tokens=4, temperature=0, seed=3)
    assert r.object == "text_completion" and r.usage.completion_tokens == 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="fake-model", prompt="once upon", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_error_objects_parse(client, server):
    with pytest.raises(openai.BadRequestError) as e:  # the fake engine has no distribution to report
        client.chat.completions.create(model="fake-model", messages=MSG, logprobs=True)
    assert e.value.body["param"] == "logprobs" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-model", messages=MSG, functions=[{"name": "f"}])
    assert e.value.body["param"] == "functions"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-model", messages=MSG, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="sk-nope-nope", max_retries=0).models.list()
    batch = OpenAI(base_url=server.url + "/v1", api_key="sk-test-batch", max_retries=0)
    batch.chat.completions.create(model="fake-model", messages=MSG, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        batch.chat.completions.create(model="fake-model", messages=MSG, max_tokens=1)
    assert e.value.response.headers["Retry-After"]


def test_context_overflow_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-model", messages=MSG, max_tokens=100_000)
    assert "maximum context length" in e.value.message
