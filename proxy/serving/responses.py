"""OpenAI's response objects for chat and text completions (pure: no I/O). The HTTP surface turns
them into JSON or server-sent events; the job runner stores `complete()` as a job's result."""

from __future__ import annotations

import time

import msgspec

from backend.protocol import Finished
from proxy.serving.record import new_request_id

_json = msgspec.json.Encoder()
_MARK = "\x00"  # a text no delta can hold as-is: JSON-encoded, it marks where the text goes


class ResponseFormatter:
    """One response's objects: a whole completion, or the chunks of a stream."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + new_request_id()
        self.model = model
        self.created = int(time.time())
        self._delta_parts: dict[bool, tuple[bytes, bytes]] = {}  # include_usage -> (head, tail)

    @staticmethod
    def usage(f: Finished) -> dict:
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens}

    def complete(self, text: str, f: Finished) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": f.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": f.finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": [choice], "usage": self.usage(f)}

    def _chunk(self, choice: dict | None, include_usage: bool) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": None,
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
        parts = self._delta_parts.get(include_usage)
        if parts is None:
            head, _, tail = _json.encode(self.delta_chunk(_MARK, include_usage)).partition(_json.encode(_MARK))
            parts = self._delta_parts[include_usage] = (b"data: " + head, tail + b"\n\n")
        return parts[0] + _json.encode(text) + parts[1]

    def final_chunk(self, reason: str, include_usage: bool) -> dict:
        return self._chunk(self._choice("", reason), include_usage)

    def usage_chunk(self, f: Finished) -> dict:
        chunk = self._chunk(None, True)
        chunk["usage"] = self.usage(f)
        return chunk
