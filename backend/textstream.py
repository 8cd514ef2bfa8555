"""Incremental detokenization and stop-sequence handling (torch-free, shared by every engine)."""

from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks multi-byte characters and words that a tokenizer merges with a
    leading space, so we decode a short window ending at the new tokens and hold text back while it
    ends in an incomplete UTF-8 sequence (U+FFFD), as vLLM and TGI do.
    """

    def __init__(self, decode: Decode, already: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = list(already)
        self._prefix = max(0, len(self.ids) - 6)
        self._read = len(self.ids)

    def windows(self) -> tuple[list[int], list[int]]:
        """The two id windows to decode (for batching many sequences into one tokenizer call)."""
        return self.ids[self._prefix : self._read], self.ids[self._prefix :]

    @property
    def caught_up(self) -> bool:
        """Nothing held back: every id so far has been turned into text."""
        return self._read == len(self.ids)

    def accept_known(self, text: str) -> str:
        """The delta of the id just appended when the caller knows its text (a token whose bytes
        are whole UTF-8 on their own, appended while caught up: decoding the windows would give
        exactly that text); the state moves as `accept` would move it."""
        self._prefix = self._read
        self._read = len(self.ids)
        return text

    def accept(self, prefix_text: str, full_text: str) -> str:
        """The text delta, given the decoded windows (after the new ids were appended to .ids)."""
        if full_text.endswith("\ufffd") or len(full_text) < len(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back when the sequence ends (may include U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Holds back text that could be the start of a stop sequence; reports when one is complete."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self._pending += text
        first = -1
        for s in self.stops:
            i = self._pending.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            out = self._pending[:first]
            self._pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
