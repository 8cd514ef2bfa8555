"""Every proxy <-> worker message and the frame codec.

Frames are a 4-byte big-endian length followed by one msgpack-encoded message. Messages are tagged
msgspec Structs encoded as arrays (small and fast on the hot path). This module imports only msgspec
and the standard library: both the proxy and the worker import it, and nothing else is shared.
"""

from __future__ import annotations

import signal
import socket
import struct
from typing import Union

import msgspec

# Part of every worker's adoption digest: a proxy adopts only workers that speak its protocol.
# 2: a step's plain tokens travel as one TokenBatch.
PROTOCOL_VERSION = 2
MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# Sent by the proxy before it kills a worker it found hung: the worker's faulthandler writes every
# thread's Python stack to stderr (the proxy's log) from its C handler, so it works while stuck.
STACK_DUMP_SIGNAL = signal.SIGUSR1


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class ChatMessage(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    role: str
    content: str
    # An assistant turn's tool calls ([{"id", "type": "function", "function": {"name", "arguments"}}])
    # and a tool turn's call id: handed to the chat template as they are.
    tool_calls: list[dict] = []
    tool_call_id: str = ""


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Union[int, None] = None
    stop: list[str] = []
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS cannot end the sequence before this many tokens (vLLM's min_tokens)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}  # token id -> added to its logit (-100..100)
    logprobs: int = -1  # -1: none; 0: the sampled token's log-probability; k: and the k most likely
    # A grammar the output must follow (llguidance's JSON grammar format, built by the proxy from
    # a JSON schema); "" for free text. The sequence ends ("stop") when the grammar is complete.
    grammar: str = ""


# proxy -> worker


class Generate(_Msg, tag="gen"):
    """Start a generation. Exactly one of `messages` (chat) or `prompt` (completion) is set.

    `resume_token_ids` are tokens already sent to the client by another worker: the engine appends
    them to the prompt, counts them against max_tokens and continues from there.
    """

    id: int
    params: SamplingParams
    messages: Union[list[ChatMessage], None] = None
    prompt: Union[str, None] = None
    resume_token_ids: list[int] = []
    tools: list[dict] = []  # function tools for the chat template ({"type": "function", "function": {...}})


class Cancel(_Msg, tag="cancel"):
    id: int


class Tokenize(_Msg, tag="tokenize"):
    """Token ids of a prompt, or of chat messages through the chat template (answered by
    TokenizeResult or Failed). The engine thread answers it between steps."""

    id: int
    messages: Union[list[ChatMessage], None] = None
    prompt: Union[str, None] = None
    tools: list[dict] = []
    add_generation_prompt: bool = True


class Detokenize(_Msg, tag="detokenize"):
    id: int
    token_ids: list[int]


# worker -> proxy


class Hello(_Msg, tag="hello"):
    """The first frame on every connection to a worker: which process it is and what it was
    started with. A proxy adopts a running worker only when the digest is the one it would start
    the slot with (settings, device, model manifest)."""

    pid: int
    digest: str
    started_at: float  # time.time() when the process started


class Ready(_Msg, tag="ready"):
    pid: int
    model: str
    device: str
    engine: str
    max_batch_size: int
    context_length: int


# the parts of a worker's engine loop whose host time heartbeats report (BatchEngine.host_seconds)
HOST_PARTS = ("encode", "prefill", "launch", "collect", "advance", "emit")


class Heartbeat(_Msg, tag="hb"):
    running: int = 0
    waiting: int = 0
    engine_stall_s: float = 0.0
    generated_tokens: int = 0
    kv_slots: int = 0  # sequences the KV cache can hold (running ones use one each)
    memory_bytes: int = 0  # the worker process's resident memory
    gpu_memory_bytes: int = 0  # memory torch holds on the worker's GPU
    weight_bytes: int = 0  # the model's weights as loaded (after quantisation)
    # the engine loop's host seconds by part (HOST_PARTS) since the process started
    # (BatchEngine.host_seconds) and its decode steps
    host_seconds: dict[str, float] = {}
    decode_steps: int = 0


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    """One sampled token's log-probability (of the model's distribution, before temperature,
    top_p, penalties and grammar masks), with the most likely alternatives when asked for."""

    token: bytes  # the token's bytes (a character may span tokens)
    logprob: float
    top: list[tuple[bytes, float]] = []


class Tokens(_Msg, tag="tok"):
    id: int
    token_ids: list[int]
    text: str
    logprobs: Union[list[TokenLogprob], None] = None  # one per token id, when the request asked


class TokenBatch(_Msg, tag="toks"):
    """Tokens frames without logprobs, column by column: what a decode step makes for many
    requests, in one message. The proxy decodes one message per step instead of one per request
    (about a fifth of the CPU per token), and the worker encodes it for less too."""

    ids: list[int]
    token_ids: list[list[int]]
    texts: list[str]


def batch_tokens(frames: list) -> list:
    """`frames` with their Tokens frames that carry no logprobs gathered into one TokenBatch at the
    place of the first. Every request's own frames keep their order: a request's tokens all carry
    logprobs or none do, and its end (Finished, Failed) comes after its tokens."""
    ids, token_ids, texts = [], [], []
    out: list = []
    at = -1
    for f in frames:
        if type(f) is Tokens and f.logprobs is None:
            if at < 0:
                at = len(out)
                out.append(None)
            ids.append(f.id)
            token_ids.append(f.token_ids)
            texts.append(f.text)
        else:
            out.append(f)
    if at >= 0:
        out[at] = TokenBatch(ids=ids, token_ids=token_ids, texts=texts)
    return out


class Finished(_Msg, tag="fin"):
    id: int
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class TokenizeResult(_Msg, tag="tokenized"):
    id: int
    token_ids: list[int] = []
    text: str = ""


class Failed(_Msg, tag="fail"):
    """One request failed. `code` is "invalid_request" (the request itself is at fault, e.g. it does
    not fit the context) or "internal" (the worker is at fault)."""

    id: int
    code: str
    message: str
    param: str = ""  # the request parameter at fault (invalid_request), when one is


class Fatal(_Msg, tag="fatal"):
    """The worker cannot go on (boot failure, out of memory, ...) and exits right after this."""

    message: str
    at_boot: bool = False


ToWorker = Union[Generate, Cancel, Tokenize, Detokenize]
FromWorker = Union[Hello, Ready, Heartbeat, Tokens, TokenBatch, Finished, Failed, Fatal, TokenizeResult]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (the kernel's word,
    SO_PEERCRED): the worker checks who connects, the proxy what it adopts."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


class FrameError(Exception):
    pass


_encoder = msgspec.msgpack.Encoder()


def encode(msg: _Msg) -> bytes:
    body = _encoder.encode(msg)
    return _HEADER.pack(len(body)) + body


def encode_many(msgs) -> bytes:
    return b"".join(encode(m) for m in msgs)


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole messages of one direction's union type."""

    def __init__(self, msg_type) -> None:
        self._decoder = msgspec.msgpack.Decoder(msg_type)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME_BYTES:
                raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
            end = pos + HEADER_SIZE + size
            if len(buf) < end:
                break
            try:
                out.append(self._decoder.decode(memoryview(buf)[pos + HEADER_SIZE : end]))
            except msgspec.DecodeError as exc:
                raise FrameError(str(exc)) from exc
            pos = end
        if pos:
            del buf[:pos]
        return out


def worker_decoder() -> FrameDecoder:
    """Decoder for the worker side (reads what the proxy sends)."""
    return FrameDecoder(ToWorker)


def proxy_decoder() -> FrameDecoder:
    """Decoder for the proxy side (reads what the worker sends)."""
    return FrameDecoder(FromWorker)


class WorkerSettings(msgspec.Struct, forbid_unknown_fields=True):
    """What the proxy hands a worker at spawn (as JSON on the command line). Workers never read YAML."""

    engine: str  # "transformers" | "fake"
    model_name: str
    model_path: str = ""
    device: str = "cpu"
    dtype: str = "auto"
    max_batch_size: int = 8
    heartbeat_interval_s: float = 1.0
    verify_manifest: bool = True
    # torch threads for CPU workers; 0 = torch's default
    cpu_threads: int = 0
    max_context: int = 0  # tokens per sequence in the KV cache; 0 = the model's maximum
    kv_cache_fraction: float = 0.9  # of the GPU memory free after loading the model
    cuda_graphs: bool = True
    prefill_budget_tokens: int = 0  # prompt tokens prefilled per step (chunked prefill); 0 = all at once
    prefill_wait_ms: float = 0.0  # how long an arrival may wait for others to prefill with while rows decode
    overlap_prefill: bool = True  # CUDA graphs: prefill arrivals on a second stream beside the decode steps
    stream_interval: int = 1  # a request's tokens sent this many at a time (BatchEngine.stream_interval)
    # fake engine only
    fake_token_latency_ms: float = 1.0
    fake_prompt_latency_ms: float = 0.0
    fake_output_tokens: int = 16
    fake_context_length: int = 4096
    fake_fail_every: int = 0
    fake_hang_after: int = 0
    fake_exit_after: int = 0
    fake_boot_fail: str = ""
    fake_boot_delay_ms: float = 0.0
