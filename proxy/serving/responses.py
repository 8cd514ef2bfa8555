"""OpenAI's response objects for chat and text completions (pure: no I/O). The HTTP surface turns
them into JSON or server-sent events; the job runner stores `complete()` as a job's result."""

from __future__ import annotations

import time

from backend.protocol import Finished
from proxy.serving.record import new_request_id


class ResponseFormatter:
    """One response's objects: a whole completion, or the chunks of a stream."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + new_request_id()
        self.model = model
        self.created = int(time.time())

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

    def final_chunk(self, reason: str, include_usage: bool) -> dict:
        return self._chunk(self._choice("", reason), include_usage)

    def usage_chunk(self, f: Finished) -> dict:
        chunk = self._chunk(None, True)
        chunk["usage"] = self.usage(f)
        return chunk
