"""OpenAI's Responses API (POST /v1/responses) on top of chat completions (pure: no I/O).

A Responses request is translated into a ChatCompletionRequest (instructions -> a system message,
input items -> messages, function tools -> tools, text.format -> response_format) and planned and
served exactly like one; its answer is then written as a Response object, or as the Responses
stream events, by responses_output.py.

Stored responses (`store`, OpenAI's default, and `previous_response_id`) live in a ResponseStore:
in the proxy's memory, bounded in bytes and age, per API key; they do not survive a restart.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import cachetools
import msgspec

from proxy.errors import InvalidRequest
from proxy.serving.openai_types import (ChatCompletionRequest, ChatMessageIn, FunctionCallIn, FunctionDef,
                                        JsonSchemaFormat, LogitBias, MaxTokens, NamedFunction, NamedToolChoice,
                                        ResponseFormat, Temperature, Tool, ToolCallIn, TopP)

_json = msgspec.json.Encoder()


# --- the request ----------------------------------------------------------------------------------
class ContentItem(msgspec.Struct):
    type: str
    text: Union[str, None] = None


class InputItem(msgspec.Struct, kw_only=True):
    """A message (type "message" or no type), a function call, or a function call's output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Union[Literal["user", "system", "developer", "assistant"], None] = None
    content: Union[str, list[ContentItem], None] = None
    call_id: Union[str, None] = None
    name: Union[str, None] = None
    arguments: Union[str, None] = None
    output: Union[str, None] = None
    id: Union[str, None] = None
    status: Union[str, None] = None


class FunctionTool(msgspec.Struct, kw_only=True):
    type: str
    name: Union[str, None] = None
    description: Union[str, None] = None
    parameters: Union[dict, None] = None
    strict: Union[bool, None] = None


class NamedFunctionChoice(msgspec.Struct):
    type: Literal["function"]
    name: str


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: Union[str, None] = None
    schema: Union[dict, None] = None
    strict: Union[bool, None] = None
    description: Union[str, None] = None


class TextParam(msgspec.Struct):
    format: Union[TextFormat, None] = None


class CreateResponse(msgspec.Struct, kw_only=True):
    model: str
    input: Union[str, Annotated[list[InputItem], msgspec.Meta(max_length=4096)]]
    instructions: Union[str, None] = None
    max_output_tokens: Union[MaxTokens, None] = None
    temperature: Union[Temperature, None] = None
    top_p: Union[TopP, None] = None
    stream: Union[bool, None] = False
    tools: Union[Annotated[list[FunctionTool], msgspec.Meta(max_length=128)], None] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunctionChoice, None] = None
    parallel_tool_calls: Union[bool, None] = None
    text: Union[TextParam, None] = None
    store: Union[bool, None] = True
    previous_response_id: Union[str, None] = None
    metadata: Union[Annotated[dict[str, str], msgspec.Meta(max_length=16)], None] = None
    user: Union[str, None] = None
    truncation: Union[Literal["disabled"], None] = None
    top_logprobs: Union[Annotated[int, msgspec.Meta(ge=0, le=20)], None] = None
    logit_bias: LogitBias = None
    # refused when set: not served here (see check)
    background: Union[bool, None] = None
    reasoning: Union[msgspec.Raw, None] = None
    include: Union[msgspec.Raw, None] = None
    conversation: Union[msgspec.Raw, None] = None
    prompt: Union[msgspec.Raw, None] = None
    max_tool_calls: Union[msgspec.Raw, None] = None

    def check(self) -> None:
        if self.background:
            raise InvalidRequest("background responses are not supported; use the jobs API.", param="background")
        for name in ("reasoning", "include", "conversation", "prompt", "max_tool_calls"):
            raw = getattr(self, name)
            if raw is not None and bytes(raw) not in (b"null", b"[]", b"{}"):
                raise InvalidRequest(f"The '{name}' parameter is not supported by this server.", param=name)
        for i, tool in enumerate(self.tools or ()):
            if tool.type != "function" or not tool.name:
                raise InvalidRequest(f"Only function tools are supported, got {tool.type!r}.",
                                     param=f"tools[{i}].type")


_decoder = msgspec.json.Decoder(CreateResponse)


def parse_create(body: bytes) -> CreateResponse:
    from proxy.serving.openai_types import raise_invalid

    try:
        req = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise_invalid(exc)
    req.check()
    return req


def _text_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise InvalidRequest(f"Only text content is supported, got {part.type!r}.", param=f"{where}.content[{j}]")
        parts.append(part.text)
    return "".join(parts)


def conversation(req: CreateResponse, earlier: list[ChatMessageIn]) -> list[ChatMessageIn]:
    """The chat messages the request stands for: an earlier stored conversation (if any), the
    instructions (never inherited, as OpenAI documents), then the input items."""
    messages: list[ChatMessageIn] = []
    if req.instructions:
        messages.append(ChatMessageIn(role="system", content=req.instructions))
    messages.extend(earlier)
    if isinstance(req.input, str):
        messages.append(ChatMessageIn(role="user", content=req.input))
        return messages
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if item.type == "message":
            if item.role is None:
                raise InvalidRequest("A message item needs a role.", param=f"{where}.role")
            messages.append(ChatMessageIn(role=item.role, content=_text_of(item.content, where)))
        elif item.type == "function_call":
            if not (item.call_id and item.name and item.arguments is not None):
                raise InvalidRequest("A function_call item needs call_id, name and arguments.", param=where)
            call = ToolCallIn(id=item.call_id, function=FunctionCallIn(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None and not last.content:
                last.tool_calls.append(call)  # consecutive calls are one assistant turn
            else:
                messages.append(ChatMessageIn(role="assistant", content=None, tool_calls=[call]))
        else:
            if not item.call_id or item.output is None:
                raise InvalidRequest("A function_call_output item needs call_id and output.", param=where)
            messages.append(ChatMessageIn(role="tool", content=item.output, tool_call_id=item.call_id))
    if not messages:
        raise InvalidRequest("input is empty.", param="input")
    return messages


def as_chat_request(req: CreateResponse, messages: list[ChatMessageIn]) -> ChatCompletionRequest:
    tools = None
    if req.tools:
        tools = [Tool(type="function", function=FunctionDef(name=t.name, description=t.description,
                                                            parameters=t.parameters, strict=t.strict))
                 for t in req.tools]
    choice = req.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    response_format = None
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        schema = None
        if fmt.type == "json_schema":
            if fmt.schema is None:
                raise InvalidRequest("text.format of type json_schema needs a schema.", param="text.format.schema")
            schema = JsonSchemaFormat(name=fmt.name or "output", schema=fmt.schema, strict=fmt.strict)
        response_format = ResponseFormat(type=fmt.type, json_schema=schema)
    chat = ChatCompletionRequest(
        model=req.model, messages=messages, max_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, stream=bool(req.stream), tools=tools, tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls, response_format=response_format,
        logprobs=True if req.top_logprobs is not None else None, top_logprobs=req.top_logprobs,
        logit_bias=req.logit_bias, user=req.user)
    chat.check_common()
    return chat


# --- stored responses -----------------------------------------------------------------------------
class StoredResponse(msgspec.Struct):
    owner: str
    body: dict  # the Response object as returned
    messages: list[ChatMessageIn]  # the whole conversation, the answer included (previous_response_id)


class ResponseStore:
    """Stored responses by id, for their owner only; bounded in bytes and age (the oldest go first)."""

    def __init__(self, max_bytes: int = 64 << 20, ttl_s: float = 3600.0) -> None:
        self._items: cachetools.TTLCache = cachetools.TTLCache(maxsize=max_bytes, ttl=ttl_s, getsizeof=len)
        self.max_entry_bytes = max_bytes // 16  # a single huge conversation may not evict everything

    def put(self, response_id: str, stored: StoredResponse) -> bool:
        data = _json.encode(stored)
        if len(data) > self.max_entry_bytes:
            return False
        self._items[response_id] = data
        return True

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        data = self._items.get(response_id)
        if data is None:
            return None
        stored = msgspec.json.decode(data, type=StoredResponse)
        return stored if stored.owner == owner else None

    def delete(self, response_id: str, owner: str) -> bool:
        if self.get(response_id, owner) is None:
            return False
        self._items.pop(response_id, None)
        return True
