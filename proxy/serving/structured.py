"""Structured outputs and tool calls (pure: no I/O).

What a request asks of its output's shape becomes an OutputShape: free text, JSON (optionally
matching a schema), or tool calls. Shapes that must always parse are enforced by constrained
decoding in the engine: the proxy compiles the JSON schema into a grammar with llguidance (the
grammar engine vLLM and SGLang use; torch-free, so the proxy can validate a schema and refuse a bad
one with a 400 before it is admitted) and the worker masks every token the grammar forbids.

Tool calls come back as text in one of two forms, parsed here into OpenAI's `tool_calls`:
- forced calls (`tool_choice: "required"` or a named function) are constrained JSON: the named
  function's arguments object, or `[{"name": ..., "arguments": {...}}, ...]` (one object when
  `parallel_tool_calls` is false);
- `tool_choice: "auto"` is free text in which the model may write
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the convention the worker
  teaches a chat template that has no tool support, and that many models' templates use).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import llguidance

from proxy.errors import InvalidRequest
from proxy.serving.record import new_request_id

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)
# Compact JSON: no free whitespace for a small model to wander in, fewer tokens per answer.
_JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SCHEMA_BYTES = 64 * 1024
# Parallel forced calls: a small model tends to repeat its first call until max_tokens; the array
# is bounded, and identical calls (same function, same arguments) are kept once.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True, slots=True)
class OutputShape:
    kind: str = "text"  # text | json | tool_named | tool_required | tool_auto
    grammar: str = ""  # for the engine ("" = unconstrained)
    tool_names: tuple[str, ...] = ()
    parallel: bool = True

    @property
    def tools(self) -> bool:
        return self.kind.startswith("tool_")


TEXT = OutputShape()


def _compile(schema: dict, param: str) -> str:
    """A JSON schema as an llguidance grammar, or a 400 naming what cannot be enforced."""
    try:
        encoded = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"The schema is not JSON: {exc}", param=param) from None
    if len(encoded) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"The schema is {len(encoded)} bytes; at most {MAX_SCHEMA_BYTES} are accepted.",
                             param=param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(encoded, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"The schema cannot be used: {exc}", param=param) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequest(f"The schema cannot be enforced: {messages[0]}", param=param)
    return grammar


def _call_schema(tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": tool.function.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def output_shape(req) -> OutputShape:
    """The shape a chat request asks for (completions are always text)."""
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    fmt = getattr(req, "response_format", None)
    if choice is not None and not tools and choice != "none":
        raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
    names = tuple(t.function.name for t in tools)
    if len(set(names)) != len(names):
        raise InvalidRequest("Tool names must be unique.", param="tools")
    if tools and choice != "none":
        if fmt is not None and fmt.type != "text":
            raise InvalidRequest("response_format cannot be combined with tools; use one or the other.",
                                 param="response_format")
        parallel = req.parallel_tool_calls is not False
        if choice is None or choice == "auto":
            return OutputShape("tool_auto", "", names, parallel)
        if choice == "required":
            one = {"anyOf": [_call_schema(t) for t in tools]} if len(tools) > 1 else _call_schema(tools[0])
            schema = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS} if parallel else one
            return OutputShape("tool_required", _compile(schema, "tools"), names, parallel)
        named = choice.function.name
        if named not in names:
            raise InvalidRequest(f"tool_choice names {named[:64]!r}, which is not among the tools.",
                                 param="tool_choice")
        tool = tools[names.index(named)]
        schema = tool.function.parameters or {"type": "object"}
        return OutputShape("tool_named", _compile(schema, f"tools[{names.index(named)}].function.parameters"),
                           (named,), False)
    if fmt is None or fmt.type == "text":
        return TEXT
    if fmt.type == "json_object":
        return OutputShape("json", _compile({"type": "object"}, "response_format"))
    if fmt.json_schema is None:
        raise InvalidRequest("response_format of type json_schema needs json_schema.", param="response_format")
    return OutputShape("json", _compile(fmt.json_schema.schema or {}, "response_format.json_schema.schema"))


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def new_call_id() -> str:
    return "call_" + new_request_id()[:24]


def parse_tool_calls(shape: OutputShape, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) from a finished answer's text. Text that holds no call stays content
    (for example a forced call cut short by max_tokens: its finish_reason says "length")."""
    if shape.kind == "tool_named":
        try:
            json.loads(text)
        except ValueError:
            return text, []
        return None, [ToolCall(new_call_id(), shape.tool_names[0], text)]
    if shape.kind == "tool_required":
        try:
            value = json.loads(text)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        try:
            unique = dict.fromkeys((item["name"], json.dumps(item["arguments"])) for item in items)
        except (KeyError, TypeError):  # not the constrained shape (cannot happen with the grammar)
            return text, []
        return None, [ToolCall(new_call_id(), name, arguments) for name, arguments in unique]
    if shape.kind == "tool_auto":
        calls: list[ToolCall] = []
        for block in _TOOL_CALL.findall(text):
            try:
                item = json.loads(block)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("name") in shape.tool_names:
                args = item.get("arguments", {})
                calls.append(ToolCall(new_call_id(), item["name"], args if isinstance(args, str) else json.dumps(args)))
        if not calls:
            return text, []
        if not shape.parallel:
            calls = calls[:1]
        content = _TOOL_CALL.sub("", text).strip()
        return content or None, calls
    return text, []


def held_back(text: str) -> int:
    """For streaming `auto` tool choice: how many characters at the end of `text` must wait,
    because they may be the start of a <tool_call> block (whole blocks are parsed at the end)."""
    start = text.find(TOOL_CALL_OPEN)
    if start != -1:
        return len(text) - start
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(TOOL_CALL_OPEN[:k]):
            return k
    return 0
