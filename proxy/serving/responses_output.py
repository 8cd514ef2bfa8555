"""The Responses API's output (pure: no I/O): a Response object, whole or as the stream events
the SDK expects, built from a chat answer (text, JSON, or function calls). The request side is in
responses_api.py."""

from __future__ import annotations

import secrets
import time

import msgspec

from backend.protocol import Finished, Tokens
from proxy.serving.openai_types import ChatMessageIn, FunctionCallIn, ToolCallIn
from proxy.serving.responses import Collected, logprob_entries
from proxy.serving.responses_api import CreateResponse
from proxy.serving.structured import OutputShape, ToolCall, held_back, new_call_id, parse_tool_calls

_json = msgspec.json.Encoder()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


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

    def outcome(self, c: Collected) -> tuple[dict, list[ChatMessageIn]]:
        """The finished Response object (non-streaming), and the assistant turn for the store."""
        content, calls = parse_tool_calls(self.shape, c.text) if self.shape.tools else (c.text, [])
        incomplete = "max_output_tokens" if c.finished.finish_reason == "length" else None
        item_status = "incomplete" if incomplete else "completed"
        if content:
            self.output.append(self._message_item(content, item_status, logprob_entries(c.logprobs)))
        for call in calls:
            self.output.append(self._call_item(call, "completed"))
        body = self.body("incomplete" if incomplete else "completed",
                         _usage(c.finished.prompt_tokens, c.finished.completion_tokens), incomplete)
        body["output_text"] = content or ""
        return body, [self.assistant_turn(content, calls)]

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
        logprobs = logprob_entries([e for t in items if t.logprobs for e in t.logprobs])
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
