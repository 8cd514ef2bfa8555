"""OpenAI's response objects for chat and text completions (pure: no I/O). The HTTP surface turns
them into JSON or server-sent events; the job runner stores `complete()` as a job's result."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from backend.protocol import Finished, TokenLogprob, Tokens
from proxy.serving.record import new_request_id
from proxy.serving.structured import TEXT, OutputShape, ToolCall, held_back, new_call_id, parse_tool_calls

_json = msgspec.json.Encoder()
_MARK = "\x00"  # a text no delta can hold as-is: JSON-encoded, it marks where the text goes


@dataclass(slots=True)
class Collected:
    """One choice's whole answer: its text, its end and (when asked for) each token's logprob."""

    text: str
    finished: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _token_entry(token: bytes, logprob: float) -> dict:
    return {"token": token.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(token)}


def logprob_entries(entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's per-token logprob objects (chat completions and the Responses API share them)."""
    return [{**_token_entry(e.token, e.logprob), "top_logprobs": [_token_entry(t, lp) for t, lp in e.top]}
            for e in entries]


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": logprob_entries(entries), "refusal": None}


def text_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    tokens, offsets = [], []
    for e in entries:
        tokens.append(e.token.decode("utf-8", "replace"))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.decode("utf-8", "replace"): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def finish_reason(reason: str, calls: list) -> str:
    """A forced or chosen tool call that ended normally reports "tool_calls"."""
    return "tool_calls" if calls and reason == "stop" else reason


class ResponseFormatter:
    """One response's objects: a whole completion, or the chunks of a stream."""

    def __init__(self, chat: bool, model: str, shape: OutputShape = TEXT, logprobs: int = -1) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + new_request_id()
        self.model = model
        self.created = int(time.time())
        self.shape = shape
        self.logprobs = logprobs  # -1: the request did not ask for logprobs
        self._delta_parts: dict[bool, tuple[bytes, bytes]] = {}  # include_usage -> (head, tail)

    def complete_choices(self, outcomes: list[Collected]) -> dict:
        """The whole response for one or more choices (n)."""
        choices = []
        for index, c in enumerate(outcomes):
            if self.chat:
                content, calls = parse_tool_calls(self.shape, c.text) if self.shape.tools else (c.text, [])
                message = {"role": "assistant", "content": content, "refusal": None}
                if calls:
                    message["tool_calls"] = [call.as_dict() for call in calls]
                choices.append({"index": index, "message": message,
                                "logprobs": chat_logprobs(c.logprobs) if self.logprobs >= 0 else None,
                                "finish_reason": finish_reason(c.finished.finish_reason, calls)})
            else:
                choices.append({"index": index, "text": c.text,
                                "logprobs": text_logprobs(c.logprobs) if self.logprobs >= 0 else None,
                                "finish_reason": c.finished.finish_reason})
        prompt_tokens = outcomes[0].finished.prompt_tokens
        completion_tokens = sum(c.finished.completion_tokens for c in outcomes)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def complete_json(self, outcomes: list[Collected], prebuilt: dict | None = None) -> bytes:
        """complete_choices(outcomes), encoded. `prebuilt` is where a cached answer keeps what it
        renders to (AnswerCache.bodies): the constant part is then encoded once per answer and
        format, and only this response's id and creation time are added each time."""
        key = self.prebuilt_format
        if prebuilt is None or key is None or len(outcomes) != 1:
            return _json.encode(self.complete_choices(outcomes))
        tail = prebuilt.get(key)
        if tail is None:
            tail = self.complete_tail(outcomes)
            if len(prebuilt) < 2:  # bounded: an answer is served in one format (its cache key names it)
                prebuilt[key] = tail
        return self.complete_from_tail(tail)

    @property
    def prebuilt_format(self) -> tuple | None:
        """What a whole response's constant part depends on, when it can be pre-built (complete_tail):
        not with tool calls (each response draws new call ids) or logprobs (never cached)."""
        if self.shape.tools or self.logprobs >= 0:
            return None
        return (self.chat, self.model, self.shape)

    def complete_tail(self, outcomes: list[Collected]) -> bytes:
        """complete_choices(outcomes) encoded, from the model on: everything but the response's own
        id and creation time, the same for every response that carries these outcomes."""
        whole = _json.encode(self.complete_choices(outcomes))
        return whole[whole.index(b',"model":'):]  # the id and the object name before it cannot hold this

    def complete_from_tail(self, tail: bytes) -> bytes:
        """The whole response's JSON around a complete_tail: what _json.encode(complete_choices())
        gives, with this response's id and creation time."""
        kind = b"chat.completion" if self.chat else b"text_completion"
        return b'{"id":"%s","object":"%s","created":%d%s' % (self.id.encode(), kind, self.created, tail)

    @staticmethod
    def usage(f: Finished) -> dict:
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens}

    def _chunk(self, choice: dict | None, include_usage: bool) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model,
               "choices": [] if choice is None else [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def _choice(self, text: str | None, reason: str | None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def first_chunk(self, include_usage: bool) -> dict:
        """The opening chunk: the assistant role for chat, an empty text for completions."""
        return self._chunk(self._choice(None, None), include_usage)

    def delta_chunk(self, text: str, include_usage: bool) -> dict:
        return self._chunk(self._choice(text, None), include_usage)

    def delta_event(self, text: str, include_usage: bool) -> bytes:
        """delta_chunk as a whole SSE event, from pre-encoded pieces: only the text is encoded
        per event (the hot path of every stream)."""
        head, tail = self.delta_event_parts(include_usage)
        return head + _json.encode(text) + tail

    def delta_event_parts(self, include_usage: bool) -> tuple[bytes, bytes]:
        """What goes before and after the JSON-encoded text in a delta_event."""
        parts = self._delta_parts.get(include_usage)
        if parts is None:
            head, _, tail = _json.encode(self.delta_chunk(_MARK, include_usage)).partition(_json.encode(_MARK))
            parts = self._delta_parts[include_usage] = (b"data: " + head, tail + b"\n\n")
        return parts

    def final_chunk(self, reason: str, include_usage: bool) -> dict:
        return self._chunk(self._choice("", reason), include_usage)

    def usage_chunk(self, f: Finished, extra_completion_tokens: int = 0) -> dict:
        """The closing usage chunk; with several choices, the others' completion tokens are added."""
        chunk = self._chunk(None, True)
        usage = self.usage(f)
        usage["completion_tokens"] += extra_completion_tokens
        usage["total_tokens"] += extra_completion_tokens
        chunk["usage"] = usage
        return chunk


class ChoiceStream:
    """The stream chunks of one choice whose output is shaped (tool calls), carries logprobs, or
    is one of several choices: the general path. Plain single text streams take the pre-encoded
    fast path (ResponseFormatter.delta_event) instead.

    Tool calls stream as OpenAI streams them: a chunk naming the call (id, name, empty
    arguments), then argument deltas. A named function's arguments are generated directly, so
    they stream as they come; `required` and `auto` calls are parsed when the answer is complete
    (with `auto`, text that may open a <tool_call> block is held back until then)."""

    def __init__(self, fmt: ResponseFormatter, index: int, include_usage: bool) -> None:
        self.fmt = fmt
        self.index = index
        self.include_usage = include_usage
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of `text` already sent as content (auto tool choice)
        self.offset = 0  # text_offset of the next completion token (logprobs)
        self.named_call: ToolCall | None = None

    def _chunk(self, delta_or_text, reason=None, logprobs=None) -> bytes:
        if self.fmt.chat:
            choice = {"index": self.index, "delta": delta_or_text, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": self.index, "text": delta_or_text, "logprobs": logprobs, "finish_reason": reason}
        return b"data: " + _json.encode(self.fmt._chunk(choice, self.include_usage)) + b"\n\n"

    def first(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""} if self.fmt.chat else "")

    def tokens(self, items: list[Tokens]) -> list[bytes]:
        text = "".join([t.text for t in items])
        entries = [e for t in items if t.logprobs for e in t.logprobs]
        self.text += text
        kind = self.fmt.shape.kind
        lp = None
        if self.fmt.logprobs >= 0 and entries:
            if self.fmt.chat:
                lp = chat_logprobs(entries)
            else:
                lp = text_logprobs(entries, self.offset)
                self.offset += sum(map(len, lp["tokens"]))
        if not self.fmt.chat:
            return [self._chunk(text, logprobs=lp)] if text or lp else []
        if kind in ("text", "json"):
            return [self._chunk({"content": text}, logprobs=lp)] if text or lp else []
        if kind == "tool_named":
            out = []
            if self.named_call is None and text:
                self.named_call = ToolCall(new_call_id(), self.fmt.shape.tool_names[0], "")
                out.append(self._chunk({"tool_calls": [self.named_call.as_dict(0)]}))
            if text:
                out.append(self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}))
            return out
        if kind == "tool_auto":
            ready = len(self.text) - held_back(self.text)  # never past a (possible) <tool_call>
            if ready > self.sent:
                content, self.sent = self.text[self.sent:ready], ready
                return [self._chunk({"content": content})]
        return []  # tool_required: parsed at the end

    def finish(self, f: Finished) -> list[bytes]:
        if not self.fmt.chat:
            return [self._chunk("", f.finish_reason)]
        kind = self.fmt.shape.kind
        out: list[bytes] = []
        calls: list = []
        if kind == "tool_named":
            calls = [self.named_call] if self.named_call is not None else []
        elif kind in ("tool_required", "tool_auto"):
            content, calls = parse_tool_calls(self.fmt.shape, self.text)
            if kind == "tool_auto":
                rest = self.text[self.sent:]
                content = (parse_tool_calls(self.fmt.shape, rest)[0] if calls else rest) or ""
            if content:
                out.append(self._chunk({"content": content}))
            for i, call in enumerate(calls):
                out.append(self._chunk({"tool_calls": [{**call.as_dict(i), "function": {"name": call.name,
                                                                                       "arguments": ""}}]}))
                out.append(self._chunk({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}))
        out.append(self._chunk({}, finish_reason(f.finish_reason, calls)))
        return out
