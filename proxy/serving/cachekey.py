"""Which requests may share an answer, and the key they share it under (pure logic).

A request is deterministic when it decodes greedily (temperature 0) or carries an explicit seed;
only those are coalesced or cached unless the config opts sampled requests in. The key is a hash
of a canonical encoding of everything that changes the output (scope, model, kind, messages or
prompt, every generation parameter) and nothing that does not (`user`, `stream`,
`stream_options`, key order in the JSON).
"""

from __future__ import annotations

import hashlib

import msgspec

from backend.protocol import ChatMessage, SamplingParams

_encoder = msgspec.msgpack.Encoder()


def shareable(params: SamplingParams, include_sampled: bool) -> bool:
    return params.temperature == 0 or params.seed is not None or include_sampled


def cache_key(scope: str, model: str, kind: str, params: SamplingParams,
              messages: list[ChatMessage] | None, prompt: str | None, tools=()) -> str:
    canonical = (
        "v3", scope, model, kind,
        [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in messages] if messages is not None else None,
        prompt,
        params.max_tokens,
        # greedy decoding ignores these: do not let them split identical greedy requests
        float(params.temperature), float(params.top_p) if params.temperature else 1.0,
        params.seed if params.temperature else None,
        list(params.stop), params.ignore_eos, params.min_tokens,
        float(params.presence_penalty), float(params.frequency_penalty), sorted(params.logit_bias.items()),
        params.logprobs, params.grammar, list(tools),
    )
    return hashlib.blake2b(_encoder.encode(canonical), digest_size=20).hexdigest()
