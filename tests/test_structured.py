"""Output shapes, tool-call parsing and the general stream formatter (pure logic, no server)."""

import json

import msgspec
import pytest

from backend.protocol import Finished, TokenLogprob, Tokens
from proxy.errors import InvalidRequest
from proxy.serving.openai_types import ChatCompletionRequest, parse
from proxy.serving.responses import ChoiceStream, ResponseFormatter
from proxy.serving.structured import OutputShape, held_back, output_shape, parse_tool_calls

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def req(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse(msgspec.json.encode(body), ChatCompletionRequest)


def test_shapes_follow_response_format_and_tool_choice():
    assert output_shape(req()).kind == "text"
    assert output_shape(req(response_format={"type": "json_object"})).grammar
    assert output_shape(req(tools=[TOOL])).kind == "tool_auto"
    assert output_shape(req(tools=[TOOL], tool_choice="none")).kind == "text"
    required = output_shape(req(tools=[TOOL], tool_choice="required"))
    assert required.kind == "tool_required" and required.grammar and required.parallel
    named = output_shape(req(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.kind == "tool_named" and named.tool_names == ("get_weather",)


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
])
def test_bad_shapes_are_refused_naming_the_parameter(fields, param):
    with pytest.raises(InvalidRequest) as e:
        output_shape(req(**fields))
    assert e.value.param == param


def test_auto_tool_calls_are_parsed_from_the_models_own_format():
    shape = OutputShape("tool_auto", "", ("get_weather",), True)
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_tool_calls(shape, text)
    assert content == "Let me check." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    # unknown tools and broken JSON are not calls: the text stays content
    for bad in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>"):
        assert parse_tool_calls(shape, bad) == (bad, [])


def test_held_back_covers_a_possible_tool_call_opening():
    assert held_back("plain text") == 0
    assert held_back("text <tool") == len("<tool")
    assert held_back("text <tool_call>{") == len("<tool_call>{")


def tokens(text, logprob=None):
    return Tokens(id=0, token_ids=[1], text=text,
                  logprobs=None if logprob is None else [TokenLogprob(text.encode(), logprob, [(text.encode(), logprob)])])


def events(chunks: list[bytes]) -> list[dict]:
    return [json.loads(c[len(b"data: "):]) for c in chunks]


def test_auto_tool_call_stream_holds_back_the_call_and_sends_it_parsed():
    fmt = ResponseFormatter(True, "m", OutputShape("tool_auto", "", ("get_weather",), True))
    stream = ChoiceStream(fmt, 0, False)
    out = []
    for piece in ["Sure. ", "<tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']:
        out += events(stream.tokens([tokens(piece)]))
    assert [e["choices"][0]["delta"] for e in out] == [{"content": "Sure. "}]  # nothing of the call leaked
    end = events(stream.finish(Finished(id=0, finish_reason="stop", prompt_tokens=1, completion_tokens=4)))
    calls = [tc for e in end for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo"}
    assert end[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_stream_with_logprobs_carries_them_per_chunk():
    fmt = ResponseFormatter(False, "m", logprobs=1)
    stream = ChoiceStream(fmt, 2, False)
    first = events(stream.tokens([tokens("Hel", -0.5), tokens("lo", -0.25)]))[0]["choices"][0]
    assert first["index"] == 2 and first["text"] == "Hello"
    assert first["logprobs"]["tokens"] == ["Hel", "lo"] and first["logprobs"]["text_offset"] == [0, 3]
    second = events(stream.tokens([tokens("!", -1.0)]))[0]["choices"][0]
    assert second["logprobs"]["text_offset"] == [5]


def test_a_prebuilt_whole_response_is_byte_for_byte_the_one_built_each_time():
    from proxy.serving.responses import Collected

    for chat in (True, False):
        for text in ('plain', 'quotes " and \\ and \n newline', "ünïcødé ✓ 𝄞", ',"model":"trap"'):
            outcome = Collected(text, Finished(id=0, finish_reason="length", prompt_tokens=7, completion_tokens=3))
            fmt = ResponseFormatter(chat, 'model "x"')
            assert fmt.prebuilt_format is not None
            tail = fmt.complete_tail([outcome])
            built = msgspec.json.encode(fmt.complete_choices([outcome]))
            assert fmt.complete_from_tail(tail) == built
            other = ResponseFormatter(chat, 'model "x"')  # another response: its own id, the same tail
            assert other.complete_from_tail(tail) == msgspec.json.encode(other.complete_choices([outcome]))
            assert json.loads(other.complete_from_tail(tail))["id"] != json.loads(built)["id"]
            kept: dict = {}  # what a cached answer keeps (AnswerCache.bodies): built once, then reused
            assert fmt.complete_json([outcome], kept) == built and list(kept.values()) == [tail]
            assert fmt.complete_json([outcome], kept) == built == fmt.complete_json([outcome])
    # tool calls draw new call ids per response, logprobs are never cached: neither is pre-built
    assert ResponseFormatter(True, "m", OutputShape("tool_auto", "", ("get_weather",), True)).prebuilt_format is None
    assert ResponseFormatter(False, "m", logprobs=1).prebuilt_format is None
