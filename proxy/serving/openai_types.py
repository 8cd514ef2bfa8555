"""OpenAI request types, parsed once into validated Structs (extra fields clients send are tolerated)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from backend.protocol import ChatMessage
from proxy.errors import InvalidRequest

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Stop = Union[str, Annotated[list[str], msgspec.Meta(max_length=4)], None]


class ContentPart(msgspec.Struct):
    type: str
    text: Union[str, None] = None


class FunctionCallIn(msgspec.Struct):
    name: str
    arguments: str


class ToolCallIn(msgspec.Struct):
    id: str
    function: FunctionCallIn
    type: Literal["function"] = "function"

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": self.function.arguments}}


class ChatMessageIn(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Union[str, None] = None
    tool_calls: Union[list[ToolCallIn], None] = None  # an assistant turn that called tools
    tool_call_id: Union[str, None] = None  # a tool turn: which call this is the result of

    def to_protocol(self, index: int) -> ChatMessage:
        """The message as the worker takes it (text content, tool calls and call id as they are)."""
        return ChatMessage(self.role, self.text(index), tool_calls=[c.as_dict() for c in self.tool_calls or ()],
                           tool_call_id=self.tool_call_id or "")

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"Only text content parts are supported, got {part.type!r}.",
                                     param=f"messages[{index}].content[{j}].type")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(max_length=64)]
    schema: Union[dict, None] = None
    strict: Union[bool, None] = None
    description: Union[str, None] = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Union[JsonSchemaFormat, None] = None


class FunctionDef(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(pattern="^[a-zA-Z0-9_-]{1,64}$")]
    description: Union[str, None] = None
    parameters: Union[dict, None] = None
    strict: Union[bool, None] = None

    def as_dict(self) -> dict:
        out = {"name": self.name, "parameters": self.parameters or {"type": "object", "properties": {}}}
        if self.description:
            out["description"] = self.description
        return out


class Tool(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDef

    def as_dict(self) -> dict:
        """The tool as the worker hands it to the chat template."""
        return {"type": "function", "function": self.function.as_dict()}


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice, None]
LogitBias = Union[Annotated[dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]],
                            msgspec.Meta(max_length=1024)], None]
# Fields of OpenAI's request we do not serve: refused by name rather than silently dropped, unless
# they hold a value that asks for nothing beyond what we do (JSON as sent, without spaces).
UNSUPPORTED = {"functions": (), "function_call": (), "audio": (), "modalities": (b'["text"]',), "prediction": (),
               "web_search_options": (), "best_of": (b"1",), "service_tier": (b'"auto"', b'"default"')}


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: Union[MaxTokens, None] = None
    temperature: Union[Temperature, None] = None
    top_p: Union[TopP, None] = None
    n: Union[Annotated[int, msgspec.Meta(ge=1, le=128)], None] = None
    stream: Union[bool, None] = False
    stream_options: Union[StreamOptions, None] = None
    stop: Stop = None
    seed: Union[Seed, None] = None
    user: Union[str, None] = None
    presence_penalty: Union[Penalty, None] = None
    frequency_penalty: Union[Penalty, None] = None
    logit_bias: LogitBias = None
    # vLLM's extensions, for benchmarks that need a fixed output length
    ignore_eos: Union[bool, None] = None
    min_tokens: Union[Annotated[int, msgspec.Meta(ge=0, le=1_000_000)], None] = None
    # refused when present (see UNSUPPORTED); typed loosely so the refusal names them
    functions: Union[msgspec.Raw, None] = None
    function_call: Union[msgspec.Raw, None] = None
    audio: Union[msgspec.Raw, None] = None
    modalities: Union[msgspec.Raw, None] = None
    prediction: Union[msgspec.Raw, None] = None
    web_search_options: Union[msgspec.Raw, None] = None
    best_of: Union[msgspec.Raw, None] = None
    service_tier: Union[msgspec.Raw, None] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (JSON object keys are strings)."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                out[int(key)] = float(value)
            except ValueError:
                raise InvalidRequest(f"logit_bias keys are token ids; {key[:40]!r} is not one.",
                                     param="logit_bias") from None
        return out

    def check_common(self) -> None:
        for name, harmless in UNSUPPORTED.items():
            raw = getattr(self, name)
            if raw is not None and bytes(raw) != b"null" and bytes(raw) not in harmless:
                raise InvalidRequest(f"The '{name}' parameter is not supported by this server.", param=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                 param="stream_options")


class ChatCompletionRequest(_Common, kw_only=True):
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    max_completion_tokens: Union[MaxTokens, None] = None
    response_format: Union[ResponseFormat, None] = None
    tools: Union[Annotated[list[Tool], msgspec.Meta(max_length=128)], None] = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: Union[bool, None] = None
    logprobs: Union[bool, None] = None
    top_logprobs: Union[Annotated[int, msgspec.Meta(ge=0, le=20)], None] = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common, kw_only=True):
    prompt: Union[str, Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]]
    echo: Union[bool, None] = False
    suffix: Union[str, None] = None
    logprobs: Union[Annotated[int, msgspec.Meta(ge=0, le=5)], None] = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def output_limit(self) -> int | None:
        return self.max_tokens


_decoders = {
    ChatCompletionRequest: msgspec.json.Decoder(ChatCompletionRequest),
    CompletionRequest: msgspec.json.Decoder(CompletionRequest),
}


def raise_invalid(exc: Exception):
    """A decoding error as the 400 OpenAI would send, naming the parameter where msgspec can."""
    if isinstance(exc, msgspec.ValidationError):
        reason, _, where = str(exc).rpartition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        if not reason:
            reason = str(exc)
        raise InvalidRequest(f"Invalid value for '{param}': {reason}" if param else reason, param=param) from None
    if isinstance(exc, msgspec.DecodeError):
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if isinstance(exc, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    if isinstance(exc, RecursionError):
        raise InvalidRequest("The request body is nested too deeply.") from None
    raise exc


def parse(body: bytes, kind: type):
    try:
        req = _decoders[kind].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise_invalid(exc)
    req.check_common()
    if kind is CompletionRequest and (req.echo or req.suffix):
        raise InvalidRequest("echo and suffix are not supported.", param="echo" if req.echo else "suffix")
    return req
