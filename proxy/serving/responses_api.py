"""OpenAI's Responses API (POST /v1/responses) on top of chat completions (pure: no I/O).

A Responses request is translated into a ChatCompletionRequest (instructions -> a system message,
input items -> messages, function tools -> tools, text.format -> response_format) and planned and
served exactly like one; its answer is then written as a Response object, or as the Responses
stream events, here.

Stored responses (`store`, OpenAI's default, and `previous_response_id`) live in a ResponseStore:
in the proxy's memory, bounded in bytes and age, per API key; they do not survive a restart.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Literal, Union

import cachetools
import msgspec

from backend.protocol import Finished, Tokens
from proxy.errors import InvalidRequest
from proxy.serving.openai_types import (ChatCompletionRequest, ChatMessageIn, FunctionCallIn, FunctionDef,
                                        JsonSchemaFormat, LogitBias, MaxTokens, NamedFunction, NamedToolChoice,
                                        ResponseFormat, Temperature, Tool, ToolCallIn, TopP)
from proxy.serving.responses import Collected
from proxy.serving.structured import OutputShape, ToolCall, held_back, new_call_id, parse_tool_calls

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


# --- the response ---------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob_entries(entries) -> list[dict]:
    return [{"token": e.token.decode("utf-8", "replace"), "logprob": e.logprob, "bytes": list(e.token),
             "top_logprobs": [{"token": t.decode("utf-8", "replace"), "logprob": lp, "bytes": list(t)}
                              for t, lp in e.top]} for e in entries]


class ResponseBuilder:
    """One Response: its object (whole, or as it stands while streaming) and its stream events."""

    def __init__(self, req: CreateResponse, shape: OutputShape, stored: bool) -> None:
        self.req = req
        self.shape = shape
        self.id = "resp_" + secrets.token_hex(16)  # unguessable: stored responses are fetched by id
        self.created_at = int(time.time())
        self.stored = stored
        self.output: list[dict] = []
        self.sequence = 0
        # streaming state
        self.text = ""
        self.sent = 0
        self.message: dict | None = None
        self.call: dict | None = None
        self.logprobs: list[dict] = []
        self.parts: list[str] = []  # the message text sent so far

    def body(self, status: str, usage: dict | None = None, incomplete: str | None = None) -> dict:
        r = self.req
        fmt = r.text.format if r.text is not None and r.text.format is not None else None
        tools = [{"type": "function", "name": t.name, "description": t.description,
                  "parameters": t.parameters, "strict": t.strict} for t in r.tools or ()]
        choice = r.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": r.model,
            "output": self.output, "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id, "store": self.stored,
            "temperature": r.temperature, "top_p": r.top_p, "top_logprobs": r.top_logprobs,
            "text": {"format": {k: v for k, v in msgspec.to_builtins(fmt).items() if v is not None}
                     if fmt is not None else {"type": "text"}},
            "tool_choice": msgspec.to_builtins(choice) if choice is not None else "auto", "tools": tools,
            "truncation": "disabled", "metadata": r.metadata or {},
            **({"usage": usage} if usage is not None else {}), **({"user": r.user} if r.user is not None else {}),
        }

    def _message_item(self, text: str, status: str, logprobs: list[dict]) -> dict:
        return {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}

    @staticmethod
    def _call_item(call: ToolCall, status: str) -> dict:
        return {"id": "fc_" + secrets.token_hex(12), "type": "function_call", "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": status}

    def outcome(self, c: Collected) -> tuple[dict, str | None, list[ChatMessageIn]]:
        """The finished Response object (non-streaming), and the assistant turn for the store."""
        content, calls = parse_tool_calls(self.shape, c.text) if self.shape.tools else (c.text, [])
        incomplete = "max_output_tokens" if c.finished.finish_reason == "length" else None
        item_status = "incomplete" if incomplete else "completed"
        if content:
            self.output.append(self._message_item(content, item_status, _logprob_entries(c.logprobs)))
        for call in calls:
            self.output.append(self._call_item(call, "completed"))
        body = self.body("incomplete" if incomplete else "completed",
                         _usage(c.finished.prompt_tokens, c.finished.completion_tokens), incomplete)
        body["output_text"] = content or ""
        return body, incomplete, [self.assistant_turn(content, calls)]

    @staticmethod
    def assistant_turn(content: str | None, calls: list[ToolCall]) -> ChatMessageIn:
        return ChatMessageIn(role="assistant", content=content or None, tool_calls=[
            ToolCallIn(id=c.id, function=FunctionCallIn(name=c.name, arguments=c.arguments)) for c in calls] or None)

    # --- streaming ------------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> bytes:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        return b"event: " + kind.encode() + b"\ndata: " + _json.encode(payload) + b"\n\n"

    def start_events(self) -> list[bytes]:
        self.sequence = -1
        return [self.event("response.created", response=self.body("in_progress")),
                self.event("response.in_progress", response=self.body("in_progress"))]

    def _open_message(self) -> list[bytes]:
        self.message = self._message_item("", "in_progress", [])
        self.message["content"] = []
        index = len(self.output)
        self.output.append(self.message)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self.event("response.output_item.added", output_index=index, item=self.message),
                self.event("response.content_part.added", item_id=self.message["id"], output_index=index,
                           content_index=0, part=part)]

    def _text_delta(self, text: str, logprobs: list[dict]) -> list[bytes]:
        out = self._open_message() if self.message is None else []
        self.logprobs.extend(logprobs)
        return out + [self.event("response.output_text.delta", item_id=self.message["id"],
                                 output_index=self.output.index(self.message), content_index=0, delta=text,
                                 logprobs=[{k: v for k, v in e.items() if k != "bytes"} for e in logprobs])]

    def _close_message(self, status: str) -> list[bytes]:
        if self.message is None:
            return []
        index = self.output.index(self.message)
        text = "".join(self.parts)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs}
        self.message["content"] = [part]
        self.message["status"] = status
        return [self.event("response.output_text.done", item_id=self.message["id"], output_index=index,
                           content_index=0, text=text,
                           logprobs=[{k: v for k, v in e.items() if k != "bytes"} for e in self.logprobs]),
                self.event("response.content_part.done", item_id=self.message["id"], output_index=index,
                           content_index=0, part=part),
                self.event("response.output_item.done", output_index=index, item=self.message)]

    def tokens(self, items: list[Tokens]) -> list[bytes]:
        text = "".join([t.text for t in items])
        logprobs = _logprob_entries([e for t in items if t.logprobs for e in t.logprobs])
        self.text += text
        kind = self.shape.kind
        if kind in ("text", "json"):
            if not text and not logprobs:
                return []
            self.parts.append(text)
            return self._text_delta(text, logprobs)
        if kind == "tool_named":
            out = []
            if self.call is None and text:
                self.call = self._call_item(ToolCall(new_call_id(), self.shape.tool_names[0], ""), "in_progress")
                self.output.append(self.call)
                out.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=dict(self.call)))
            if text:
                self.call["arguments"] += text
                out.append(self.event("response.function_call_arguments.delta", item_id=self.call["id"],
                                      output_index=self.output.index(self.call), delta=text))
            return out
        if kind == "tool_auto":
            ready = len(self.text) - held_back(self.text)
            if ready > self.sent:
                piece, self.sent = self.text[self.sent:ready], ready
                self.parts.append(piece)
                return self._text_delta(piece, [])
        return []

    def finish_events(self, f: Finished) -> tuple[list[bytes], dict, list[ChatMessageIn]]:
        incomplete = "max_output_tokens" if f.finish_reason == "length" else None
        status = "incomplete" if incomplete else "completed"
        out: list[bytes] = []
        calls: list[ToolCall] = []
        content = None
        if self.shape.kind == "tool_named" and self.call is not None:
            self.call["status"] = "completed"
            index = self.output.index(self.call)
            out.append(self.event("response.function_call_arguments.done", item_id=self.call["id"],
                                  output_index=index, name=self.call["name"], arguments=self.call["arguments"]))
            out.append(self.event("response.output_item.done", output_index=index, item=self.call))
            calls = [ToolCall(self.call["call_id"], self.call["name"], self.call["arguments"])]
        elif self.shape.kind in ("tool_required", "tool_auto"):
            rest = self.text[self.sent:]
            content, calls = parse_tool_calls(self.shape, rest)
            if content:
                self.parts.append(content)
                out += self._text_delta(content, [])
            out += self._close_message(status)
            for call in calls:
                item = self._call_item(call, "completed")
                self.output.append(item)
                index = len(self.output) - 1
                out.append(self.event("response.output_item.added", output_index=index,
                                      item={**item, "arguments": "", "status": "in_progress"}))
                out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=call.arguments))
                out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=call.name, arguments=call.arguments))
                out.append(self.event("response.output_item.done", output_index=index, item=item))
            content = "".join(self.parts) or None
        else:
            content = self.text
        if self.shape.kind in ("text", "json", "tool_named"):
            out += self._close_message(status)
        body = self.body(status, _usage(f.prompt_tokens, f.completion_tokens), incomplete)
        body["output_text"] = "".join(self.parts)
        out.append(self.event("response.incomplete" if incomplete else "response.completed", response=body))
        return out, body, [self.assistant_turn(content, calls)]
