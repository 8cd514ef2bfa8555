"""The fake engine: the real worker protocol and batching loop, no model.

Deterministic text derived from the prompt (and seed), a configurable prompt and per-token latency
(one sleep per decode step for the whole batch, like a GPU), and fault injection for tests. Used by
proxy tests and proxy benchmarks on machines without a GPU; never the default.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

from backend.protocol import Generate, WorkerSettings
from backend.scheduler import BatchEngine, EngineSequence, InternalError, RequestError

WORDS = (
    "the quick brown fox jumps over lazy dog while seven bright stars watch a quiet river "
    "flow past old stone bridges under morning light and every small bird sings its song"
).split()
EOS_ID = len(WORDS)
# token ids 0..len(WORDS)-1 are words (each with a leading space); EOS_ID ends a sequence


class FakeEngine(BatchEngine):
    name = "fake"
    vocab_size = EOS_ID + 1

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings.max_batch_size, settings.fake_context_length, [EOS_ID])
        self.settings = settings
        self.token_latency = settings.fake_token_latency_ms / 1000.0
        self.prompt_latency = settings.fake_prompt_latency_ms / 1000.0
        self.prefill_wait_s = settings.prefill_wait_ms / 1000.0
        self.stream_interval = settings.stream_interval
        self.requests_seen = 0
        if settings.fake_boot_delay_ms:
            time.sleep(settings.fake_boot_delay_ms / 1000)  # stands in for loading a model
        if settings.fake_boot_fail:
            raise RuntimeError(settings.fake_boot_fail)

    def encode(self, req: Generate, add_generation_prompt: bool = True) -> list[int]:
        if isinstance(req, Generate) and req.id >= 0:  # a generation, not the warm-up or a tokenize call
            self._inject_faults()
        if req.messages is not None:
            text = "\n".join(f"{m.role}: {m.content}" for m in req.messages)
        else:
            text = req.prompt or ""
        return [len(w) % EOS_ID for w in text.split()] or [0]

    def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(" " + WORDS[i] for i in ids if i < EOS_ID)

    def check_params(self, req: Generate) -> None:
        """The fake engine has no distribution to shape or report: refuse what it cannot honour."""
        p = req.params
        for name, value in (("presence_penalty", p.presence_penalty), ("frequency_penalty", p.frequency_penalty),
                            ("logit_bias", p.logit_bias), ("logprobs", p.logprobs >= 0), ("tools", req.tools)):
            if value:
                raise RequestError(f"the fake engine does not support {name}", param=name)

    def _inject_faults(self) -> None:
        s = self.settings
        self.requests_seen += 1
        if s.fake_exit_after and self.requests_seen >= s.fake_exit_after:
            os._exit(17)
        if s.fake_hang_after and self.requests_seen >= s.fake_hang_after:
            while True:  # the engine loop hangs; the worker's heartbeats report the stall
                time.sleep(3600)
        if s.fake_fail_every and self.requests_seen % s.fake_fail_every == 0:
            raise InternalError(f"injected failure (request {self.requests_seen})")

    def prefill(self, seqs: list[EngineSequence]) -> list[int]:
        if self.prompt_latency and any(seq.id >= 0 for seq in seqs):
            time.sleep(self.prompt_latency)
        for seq in seqs:
            digest = hashlib.blake2b(repr((seq.prompt_ids, seq.params.seed if seq.params.temperature else None)).encode(),
                                     digest_size=8).digest()
            seq.slot = int.from_bytes(digest, "big")
        return [self._next(seq) for seq in seqs]

    def decode(self, seqs: list[EngineSequence]) -> list[int]:
        if self.token_latency and any(seq.id >= 0 for seq in seqs):  # the warm-up runs at full speed
            time.sleep(self.token_latency)
        return [self._next(seq) for seq in seqs]

    def _next(self, seq: EngineSequence) -> int:
        n = len(seq.generated)
        if n >= self.settings.fake_output_tokens:
            return EOS_ID
        return (seq.slot >> (n % 48)) % EOS_ID if n % 7 else (seq.slot + n) % EOS_ID
