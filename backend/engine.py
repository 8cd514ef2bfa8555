"""The transformers engine: the only module that imports torch and transformers.

Continuous batching over a preallocated slot KV cache. The model is the transformers model class,
unchanged; only its attention goes through `slot_attention` (registered with transformers'
AttentionInterface), which writes each new key/value into the request's slot and attends over the
slot's cached prefix:

- every step decodes all running sequences together (batch row b = slot b; slots are handed out
  lowest-first, so the rows in use stay packed at the front);
- new requests are prefilled between steps, several at once (right-padded, causal); on CUDA a
  few at a time (up to 16 prompts of up to 512 tokens) run as captured graphs too, padded to a
  (rows, width) bucket, filler rows writing a scratch slot past the last sequence's;
- finished or cancelled requests free their slot at once;
- on CUDA the decode step runs as a captured CUDA graph, one per (batch bucket, length bucket);
  on CPU the same code runs eagerly.

The request lifecycle (max_tokens, EOS, stop sequences, streaming frames) lives in BatchEngine.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from backend import decode_attention, layer_kernels
from backend.fp8 import fp8_supported, quantize_fp8
from backend.fused import FusedPieces
from backend.manifest import ManifestError, has_manifest, verify_manifest
from backend.protocol import Generate, SamplingParams, TokenLogprob, WorkerSettings
from backend import sampling
from backend.scheduler import BatchEngine, RequestError, EngineSequence
from backend.textstream import IncrementalDetokenizer

log = logging.getLogger("fullpower.worker")

ATTENTION = "fullpower_slots"
# Tokens per eager prefill forward (rows x padded length). An eager forward costs the host ~30 ms
# of launches on the H200 whatever its size, so a wave of arrivals goes in few, large forwards
# (256 prompts of 128 tokens: 2); the activations of 16k tokens of the 8B shape are ~2 GB.
PREFILL_TOKEN_BUDGET = 16384
MIN_LENGTH_BUCKET = 64
# Small prefills (a few arrivals between decode steps) run as captured graphs, padded to these
# buckets: eagerly, a prefill costs the host ~30 ms of launches whatever its size (measured on the
# H200, 1B shape), and every running stream waits for it. Larger ones are bound by the GPU anyway.
PREFILL_GRAPH_ROWS = 16
PREFILL_GRAPH_WIDTHS = (32, 64, 128, 256, 512)
PREFILL_GRAPH_TOKENS = 4096  # rows x width of the largest captured prefill


class BootError(Exception):
    """The engine cannot start (bad model, manifest mismatch, unusable device)."""


class _Step:
    """What slot_attention needs for one forward pass; handed down through the model's kwargs."""

    __slots__ = ("k", "v", "decode", "rows", "positions", "length", "start", "splits", "lengths", "_additive_mask")

    def __init__(self, k, v, decode: bool, rows: torch.Tensor, positions: torch.Tensor | None = None,
                 length: int = 0, start: int = 0, splits: int = 0) -> None:
        self.k, self.v, self.decode, self.rows, self.positions, self.length = k, v, decode, rows, positions, length
        self.start = start  # prefill: the position of the first new token (a later chunk of a long prompt)
        self.splits = splits  # decode: > 0 attends with the live-prefix kernel, in this many splits per row
        self.lengths = positions + 1 if splits else None  # decode: each row's live prefix, this token included
        self._additive_mask = None

    def additive_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The step's boolean mask as SDPA turns it into an additive one (0 where attended, -inf
        elsewhere, in the query's dtype), made once per step: given the boolean mask, SDPA makes it
        again in every layer - a kernel per layer (3.5 us each on the H100 at the 8B shape)."""
        if mask.dtype != torch.bool:
            return mask
        if self._additive_mask is None or self._additive_mask.dtype != dtype:
            # (no tensor made from a Python value on the host: this runs inside graph capture)
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            self._additive_mask = additive.masked_fill_(mask.logical_not(), float("-inf"))
        return self._additive_mask


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, fp_step: _Step = None,
                   **kwargs):
    """query [rows, heads, T, dim]; key/value [rows, kv_heads, T, dim] for the new tokens only."""
    if fp_step is None:  # called outside the engine (e.g. HF generate as a reference): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    k_cache, v_cache = fp_step.k[module.layer_idx], fp_step.v[module.layer_idx]
    if fp_step.decode:
        rows, positions = fp_step.rows, fp_step.positions
        if layer_kernels.write_kv_fits(key, value, k_cache, v_cache):
            layer_kernels.write_kv(key, value, k_cache, v_cache, rows, positions)  # one kernel for both
        else:
            k_cache[rows, :, positions] = key[:, :, 0]
            v_cache[rows, :, positions] = value[:, :, 0]
        if fp_step.splits:  # only each row's live prefix (positions 0 .. its position)
            return decode_attention.decode_attention(query, k_cache, v_cache, fp_step.lengths, scaling,
                                                     fp_step.splits), None
        n, length = query.shape[0], fp_step.length
        out = F.scaled_dot_product_attention(query, k_cache[:n, :, :length], v_cache[:n, :, :length],
                                             attn_mask=fp_step.additive_mask(attention_mask, query.dtype),
                                             scale=scaling, enable_gqa=True)
    elif fp_step.start == 0:  # prefill from position 0: the prompt attends to itself, causally
        t = query.shape[2]
        k_cache[fp_step.rows, :, :t] = key
        v_cache[fp_step.rows, :, :t] = value
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:  # a later chunk of a prompt: it attends to the prefix in the cache, and causally to itself
        t, start = query.shape[2], fp_step.start
        end = start + t
        k_cache[fp_step.rows, :, start:end] = key
        v_cache[fp_step.rows, :, start:end] = value
        cols = torch.arange(end, device=query.device)
        mask = cols[None, :] <= (start + torch.arange(t, device=query.device))[:, None]
        out = F.scaled_dot_product_attention(query, k_cache[fp_step.rows, :, :end], v_cache[fp_step.rows, :, :end],
                                             attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, slot_attention)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype activations, the KV cache and unquantised weights use (int8 and fp8 compute in
    auto's: fp8 quantises each layer's input itself and returns its product in this dtype)."""
    if name in ("auto", "int8", "fp8"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise BootError(f"unknown dtype {name!r}") from None
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BootError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; use float16")
    return dtype


def quantize_int8(model: torch.nn.Module) -> None:
    """Weight-only int8 for the decoder's linear layers, with torchao (PyTorch's own quantisation
    library: maintained with torch, CPU and CUDA kernels, and its tensors work under torch.compile
    and CUDA graphs). lm_head stays in the compute dtype: it is tied to the embeddings in small
    models, and the logits are where precision shows first."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise BootError(f"dtype int8 needs the torchao package on the worker's host ({exc}); "
                        "install it or choose float32, bfloat16 or float16") from None
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters hold (shared ones once; quantised tensors by their parts)."""
    total = 0
    for param in model.parameters():
        data = param.data
        flatten = getattr(data, "__tensor_flatten__", None)
        if flatten is not None and type(data) is not torch.Tensor:
            names, _ = flatten()
            total += sum(t.numel() * t.element_size() for t in (getattr(data, n) for n in names)
                         if isinstance(t, torch.Tensor))
        else:
            total += data.numel() * data.element_size()
    return total


def _loads(arguments):
    """A tool call's arguments as an object where they parse (they come as a JSON string)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    size = floor
    while size < n:
        size *= 2
    return min(size, cap)


class _DecodeStep:
    """One launched decode step: its rows, and its sampled tokens on the device (`tokens`, copied
    to `host` behind `event`) or already on the host (`ids`)."""

    __slots__ = ("seqs", "slots", "tokens", "host", "event", "ids")

    def __init__(self, seqs: list[EngineSequence], slots: list[int]) -> None:
        self.seqs, self.slots = seqs, slots
        self.tokens = self.host = self.event = self.ids = None


class _SidePrefill:
    """Arrivals prefilled beside the decode steps (TransformersEngine.prefill_beside): their rows,
    their first tokens on the device (`tokens`) and copied to `host` behind `done` (on CUDA)."""

    __slots__ = ("seqs", "slots", "tokens", "host", "done")

    def __init__(self, seqs: list[EngineSequence]) -> None:
        # the slots as reserved: a row cancelled before it joins gives its slot back (slot None)
        self.seqs, self.slots = seqs, [s.slot for s in seqs]
        self.tokens = self.host = self.done = None


class _PaddedPrefill:
    """A prefill of up to `rows` prompts of up to `width` tokens, over static input tensors: on
    CUDA replayed from a captured graph, elsewhere run eagerly over the same padded inputs."""

    def __init__(self, engine: "TransformersEngine", rows: int, width: int, capture: bool = False) -> None:
        d = engine.device
        self.rows, self.width = rows, width
        self.ids = torch.full((rows, width), engine.pad_id, dtype=torch.long, device=d)
        self.slots = torch.full((rows,), engine._scratch_slot, dtype=torch.long, device=d)
        self.last = torch.zeros(rows, dtype=torch.long, device=d)
        self.graph = self.out = None
        if capture:
            # as for the decode graphs: warm-up runs on a side stream, then the capture; with the
            # slots all the scratch slot, they write nothing a sequence owns
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    engine._prefill_forward(self.ids, self.slots, self.last)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # a pool of their own: a prefill graph replays beside a decode graph (prefill_beside),
            # and graphs that share a pool share their intermediate buffers
            with torch.cuda.graph(self.graph, pool=engine._prefill_graph_pool):
                self.out = engine._prefill_forward(self.ids, self.slots, self.last)

    def run(self, engine: "TransformersEngine", group: list[EngineSequence]) -> torch.Tensor:
        """The logits of each prompt's last position (rows of a static output on CUDA: sample them
        before the next prefill)."""
        n = len(group)
        ids = engine._padded_ids(group, self.rows, self.width)
        last = [len(s.all_ids) - 1 for s in group] + [0] * (self.rows - n)
        slots = [s.slot for s in group] + [engine._scratch_slot] * (self.rows - n)
        pinned = engine._pinned
        self.ids.copy_(ids.pin_memory() if pinned else ids, non_blocking=True)
        self.last.copy_(torch.tensor(last, pin_memory=pinned), non_blocking=True)
        self.slots.copy_(torch.tensor(slots, pin_memory=pinned), non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.out[:n]
        return engine._prefill_forward(self.ids, self.slots, self.last)[:n]


class TransformersEngine(BatchEngine):
    name = "transformers"
    chunked_prefill = True

    def __init__(self, settings: WorkerSettings, padded_prefill: bool | None = None) -> None:
        """`padded_prefill`: prefill small groups padded to (rows, width) buckets, as captured
        graphs on CUDA (None: where graphs are on); tests turn it on to run the padding on the CPU."""
        path = Path(settings.model_path)
        if not (path / "config.json").is_file():
            raise BootError(f"{path}: not a model directory (no config.json); "
                            "run `fullpower model prepare` for the embedded model")
        if settings.verify_manifest:
            if has_manifest(path):
                try:
                    verify_manifest(path)
                except ManifestError as exc:
                    raise BootError(f"refusing to load the model: {exc}") from exc
            else:
                log.warning("%s has no manifest; loading it unverified", path)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        self.device = torch.device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._decode_batch = self._batch_decoder()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, attn_implementation=ATTENTION)
        self.model.to(self.device).eval()
        if settings.dtype == "int8":
            quantize_int8(self.model)
        elif settings.dtype == "fp8":
            unsupported = fp8_supported(self.device)
            if unsupported:
                raise BootError(f"dtype fp8: {unsupported}; choose bfloat16, float16 or int8")
            compile_quantize = settings.cuda_graphs and self.device.type == "cuda"  # as the fused pieces
            log.info("fp8: %d linear layers quantised (W8A8, per channel and per token)",
                     quantize_fp8(self.model, compile_quantize))
        self.weight_bytes = weight_bytes(self.model)
        log.info("model weights: %.0f MiB (%s)", self.weight_bytes / 2**20, settings.dtype)
        self.body, self.lm_head = self.model.model, self.model.lm_head
        config = self.model.config
        eos = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        model_len = getattr(config, "max_position_embeddings", None) or 2048
        max_len = min(settings.max_context or model_len, model_len)
        self.use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        if self.use_graphs and settings.dtype == "int8":
            # torchao's int8 weight-only linear dequantises each weight on every call; inside a
            # captured graph those copies live as long as the graph, one set per captured shape,
            # which spent all of an H200's memory on the 1B shape. int8 runs eagerly on GPU.
            log.warning("dtype int8: CUDA graphs off (each captured step would keep dequantised weights)")
            self.use_graphs = False
        self.padded_prefill = self.use_graphs if padded_prefill is None else padded_prefill
        # The padded prefill's filler rows write their keys and values into a slot of their own,
        # one past the last slot a sequence can have.
        slots = self._allocate_kv(config, settings, max_len, scratch=self.padded_prefill)
        self._scratch_slot = slots
        super().__init__(slots, max_len, sorted(eos))
        self.prefill_budget = settings.prefill_budget_tokens
        self.prefill_wait_s = settings.prefill_wait_ms / 1000
        self.stream_interval = settings.stream_interval
        self.admit_together = PREFILL_GRAPH_ROWS  # the largest captured prefill
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._template_knows_tools = "tools" in (self.tokenizer.chat_template or "")
        self._free = list(range(slots))  # a heap: the lowest free slot goes first
        self.vocab_size = config.vocab_size
        self.token_text = self._context_free_token_text()
        d = self.device
        self._ids = torch.zeros((slots, 1), dtype=torch.long, device=d)
        self._pos = torch.zeros(slots, dtype=torch.long, device=d)
        self._rows = torch.arange(slots, dtype=torch.long, device=d)
        self._cols = torch.arange(max_len, dtype=torch.long, device=d)
        # Decode attention over each row's live prefix (a Triton kernel, backend/decode_attention.py)
        # instead of SDPA over the length bucket: off, because on the H200 it saved only 0.3 ms of
        # a 4.1 ms step (135M) and its rounding differs enough from SDPA's that greedy output left
        # HF generate's after 2-21 tokens on the 1B and 8B shapes (docs/benchmarks.md section 14).
        # An attribute so that the GPU benchmark can compare both in one process (the graph cache
        # is keyed by it); usable only where decode_attention.available().
        self.live_prefix_attention = False
        self._programs_wanted = (4 * torch.cuda.get_device_properties(d).multi_processor_count
                                 if d.type == "cuda" else 8)
        # RMSNorm, the MLP's activation and the rotary embedding as fused compiled kernels (see
        # backend/fused.py): with graphs on CUDA only, where kernel count bounds the step.
        self.fused = FusedPieces(self.model)
        if self.use_graphs:
            log.info("fused pieces: %d modules swapped (rotary: %s)", self.fused.apply(), self.fused.rotary_swapped)
        self._graphs: dict[tuple[int, int, bool, bool], tuple] = {}
        # (rows, width) -> the padded prefill's static inputs and, on CUDA, its captured graph
        self._prefill_graphs: dict[tuple[int, int], "_PaddedPrefill"] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._prefill_graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Arrivals that fit a captured prefill graph are prefilled on a second CUDA stream while
        # the running rows' decode steps go on (prefill_beside): a small model's decode step and
        # prefill are each a few hundred small kernels that leave most of the GPU idle, so the two
        # overlap instead of taking turns. Tests turn it on to run the same bookkeeping on the CPU.
        self.overlap_prefill = self.padded_prefill and self.use_graphs and settings.overlap_prefill
        self._side_stream = torch.cuda.Stream(d) if self.overlap_prefill else None
        self._pinned = d.type == "cuda"
        self._lltok = None  # llguidance's tokenizer, on first use (see _ll_tokenizer)
        self._executor = None  # llguidance's thread pool for many rows' masks, on first use
        self._eos_tensor = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=d)
        self._bytes_of: dict[int, bytes] = {}  # token id -> its bytes (bounded by the vocabulary)
        # byte value -> its 8 bits, least significant first (llguidance's bitmask order)
        self._bit_table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().to(d)
        # many rows' masks in parallel pays off with cores to spare (measured: not on 2 cores)
        self._parallel_masks = (os.cpu_count() or 1) >= 8

    def _allocate_kv(self, config, settings: WorkerSettings, max_len: int, scratch: bool) -> int:
        layers = config.num_hidden_layers
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_slot = 2 * layers * kv_heads * max_len * head_dim * torch.finfo(self.dtype).bits // 8
        slots = settings.max_batch_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * settings.kv_cache_fraction)
            slots = min(slots, budget // per_slot)
            if slots < 1:
                raise BootError(f"the KV cache for one sequence of {max_len} tokens needs {per_slot >> 20} MiB; "
                                f"only {budget >> 20} MiB are available (lower max_context)")
        shape = (slots + scratch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        log.info("KV cache: %d slots x %d tokens (%.0f MiB)", slots, max_len, slots * per_slot / 2**20)
        return slots

    # --- tokens ---------------------------------------------------------------------------------
    def encode(self, req: Generate, add_generation_prompt: bool = True) -> list[int]:
        if req.messages is not None:
            messages, tools = self._conversation(req)
            try:
                ids = self.tokenizer.apply_chat_template(messages, tools=tools,
                                                         add_generation_prompt=add_generation_prompt, tokenize=True)
            except Exception as exc:  # a template that rejects the conversation (e.g. role order)
                raise RequestError(f"messages: {exc}", param="messages") from exc
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer(req.prompt or "").input_ids) or [self.pad_id]

    def encode_many(self, reqs: list[Generate]) -> list:
        """Prompts in one call into the tokenizers library (it tokenizes them on its own threads,
        without the interpreter lock): plain prompts together, and conversations without tools
        through transformers' batched chat template. A batch the template refuses is encoded one
        by one, so that only the request at fault fails. Measured on the H200 host: 256 prompts
        of 128 tokens took 49-90 ms one by one, every arriving request waiting for all of them."""
        out: list = [None] * len(reqs)
        prompts = [i for i, r in enumerate(reqs) if r.messages is None]
        if prompts:
            ids = self.tokenizer([reqs[i].prompt or "" for i in prompts]).input_ids
            for i, row in zip(prompts, ids):
                out[i] = list(row) or [self.pad_id]
        chats = [i for i, r in enumerate(reqs) if r.messages is not None and not r.tools]
        if len(chats) > 1:
            try:
                ids = self.tokenizer.apply_chat_template([self._conversation(reqs[i])[0] for i in chats],
                                                         add_generation_prompt=True, tokenize=True)
                ids = ids if isinstance(ids, list) else ids["input_ids"]
                for i, row in zip(chats, ids):
                    out[i] = list(row)
            except Exception:  # noqa: BLE001 - one conversation the template rejects: find it below
                pass
        for i, req in enumerate(reqs):
            if out[i] is None:
                try:
                    out[i] = self.encode(req)
                except RequestError as exc:
                    out[i] = exc
        return out

    def _conversation(self, req: Generate) -> tuple[list[dict], list[dict] | None]:
        """The messages (and tools) for the chat template. A template that knows tools gets them
        as they are; for one that does not (the embedded model's), tools, calls and results are
        written into the conversation in the widespread <tool_call> convention, which the proxy
        parses back out of the answer."""
        template_knows_tools = self._template_knows_tools
        messages = []
        for m in req.messages:
            entry = {"role": m.role, "content": m.content}
            if template_knows_tools:
                if m.tool_calls:
                    entry["tool_calls"] = m.tool_calls
                if m.tool_call_id:
                    entry["tool_call_id"] = m.tool_call_id
            else:
                for call in m.tool_calls:
                    fn = call.get("function", {})
                    entry["content"] += ("<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": _loads(
                        fn.get("arguments"))}) + "</tool_call>")
                if m.role == "tool":
                    entry = {"role": "user", "content": "<tool_response>" + json.dumps(
                        {"tool_call_id": m.tool_call_id, "content": m.content}) + "</tool_response>"}
            messages.append(entry)
        if not req.tools:
            return messages, None
        if template_knows_tools:
            return messages, list(req.tools)
        listing = "\n".join(json.dumps(t.get("function", t)) for t in req.tools)
        guide = ("You may call these functions:\n<tools>\n" + listing + "\n</tools>\nTo call one, reply with "
                 '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>')
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + guide}
        else:
            messages.insert(0, {"role": "system", "content": guide})
        return messages, None

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def detokenize_batch(self, windows: list[Sequence[int]]) -> list[str]:
        return self._decode_batch(windows, skip_special_tokens=True)

    def _batch_decoder(self):
        """The tokenizers library's own batch call where it gives transformers' text: one call into
        Rust for every row's windows instead of transformers' Python loop over rows (4-6x less host
        time per step on 256 rows, docs/benchmarks.md section 14) - host time the pipelined GPU
        step would otherwise wait for. transformers' batch_decode where it adds work of its own
        (cleaning up tokenization spaces) or the tokenizer is not a Rust one."""
        rust = getattr(self.tokenizer, "_tokenizer", None)
        if callable(getattr(rust, "decode_batch", None)) and not getattr(self.tokenizer,
                                                                         "clean_up_tokenization_spaces", True):
            return rust.decode_batch
        return self.tokenizer.batch_decode

    def _context_free_token_text(self) -> "list[str | None] | None":
        """Each token's text where appending it to any ids appends exactly that text - for the
        scheduler's rows, which then need no tokenizer call (~0.7-2 ms per step of 256 rows on
        the H200 host, on the engine's thread). That holds for a byte-level tokenizer decoded
        through the tokenizers library alone: decoding is the UTF-8 of the tokens' bytes put
        together (invalid bytes replaced), so a token whose bytes are whole UTF-8 on their own
        cannot join with its neighbours' and appends its own text whatever came before. Added and
        special tokens, and any whose text is empty or holds U+FFFD, go through the tokenizer."""
        import tokenizers.decoders

        rust = getattr(self.tokenizer, "_tokenizer", None)
        if self._decode_batch != getattr(rust, "decode_batch", None) or \
                type(getattr(rust, "decoder", None)) is not tokenizers.decoders.ByteLevel:
            return None
        size = rust.get_vocab_size(with_added_tokens=True)
        texts = rust.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
        added = set(self.tokenizer.added_tokens_decoder)
        table = [None if i in added or not t or "\ufffd" in t else t for i, t in enumerate(texts)]
        # ids the model has beyond the tokenizer's (a padded vocabulary) go through the tokenizer
        return table + [None] * (self.vocab_size - len(table))

    # --- model ----------------------------------------------------------------------------------
    def reserve(self, seq: EngineSequence) -> None:
        seq.slot = heapq.heappop(self._free)

    def prefill(self, seqs: list[EngineSequence]) -> list[int]:
        for s in seqs:
            if s.slot is None:
                self.reserve(s)
        first: dict[int, int] = {}
        group: list[EngineSequence] = []
        for s in sorted(seqs, key=lambda s: len(s.all_ids)):
            width = max([len(s.all_ids)] + [len(g.all_ids) for g in group])
            if group and width * (len(group) + 1) > PREFILL_TOKEN_BUDGET:
                first.update(self._prefill_group(group))
                group = []
            group.append(s)
        first.update(self._prefill_group(group))
        return [first[id(s)] for s in seqs]

    def prefill_beside(self, seqs: list[EngineSequence]) -> "_SidePrefill | None":
        """Prefill `seqs` on the side stream while the decode steps queued and to come run on the
        main one; they join a later step through launch_next(joining=...), or the host's
        first_tokens() and a fresh launch. Only groups that fit a captured prefill graph and sample
        on the device alone.

        The KV cache is shared, so: every decode step writes a key and value for each slot below
        its row count at that slot's position, member or not - so the new rows' positions are set
        first (to their first output position, which their own first decode step writes before
        reading), and the prefill starts only after the steps already queued, which were launched
        with the slots' old positions. A decode step that runs beside the prefill writes only
        past the new prompts and reads the new rows only for output nobody keeps."""
        if any(s.needs_host for s in seqs):
            return None
        padded = self._padded_prefill_for(seqs)  # None for more rows than the largest graph
        if padded is None or (self.device.type == "cuda" and padded.graph is None):
            return None
        for s in seqs:
            if s.slot is None:
                self.reserve(s)
        joining = _SidePrefill(seqs)
        self._pos[self._to_device(joining.slots)] = self._to_device([len(s.all_ids) for s in seqs])
        if self._side_stream is None:  # the CPU: the same bookkeeping, one stream
            joining.tokens = joining.host = self._sample_on_device(padded.run(self, seqs), seqs, 0)
            return joining
        queued = torch.cuda.Event()
        queued.record()
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_event(queued)
            joining.tokens = self._sample_on_device(padded.run(self, seqs), seqs, 0)
            joining.host = torch.empty(len(seqs), dtype=torch.long, pin_memory=True)
            joining.host.copy_(joining.tokens, non_blocking=True)
            joining.done = torch.cuda.Event()
            joining.done.record()
        return joining

    def first_tokens(self, joining: "_SidePrefill") -> list[int]:
        if joining.done is not None:
            joining.done.synchronize()
        return joining.host.tolist()

    def _prefill_group(self, group: list[EngineSequence]) -> dict[int, int]:
        padded = self._padded_prefill_for(group)
        logits = self._prefill_logits(group) if padded is None else padded.run(self, group)
        tokens = self._sample(logits, group)
        return {id(s): t for s, t in zip(group, tokens)}

    def _padded_prefill_for(self, group: list[EngineSequence]) -> "_PaddedPrefill | None":
        """The (rows, width) bucket this group's prefill runs in padded, if any: on CUDA only the
        buckets captured at warm-up (a new capture would stall the running streams)."""
        if not self.padded_prefill or len(group) > PREFILL_GRAPH_ROWS:
            return None
        width = max(len(s.all_ids) for s in group)
        key = (_bucket(len(group), PREFILL_GRAPH_ROWS), _bucket(width, self.context_length, PREFILL_GRAPH_WIDTHS[0]))
        if width > key[1] or key[0] * key[1] > PREFILL_GRAPH_TOKENS:
            return None
        entry = self._prefill_graphs.get(key)
        if entry is None and not self.use_graphs:
            entry = self._prefill_graphs[key] = _PaddedPrefill(self, *key)
        return entry

    def _prefill_forward(self, ids: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A prefill from position 0 of right-padded prompts `ids` [n, width] into the KV slots
        `rows`, the logits of each row's position `last` (the eager prefill's, and the padded one's
        over static inputs, captured as a graph on CUDA). What the padding computes nothing reads:
        a prompt's padding writes its own slot past the prompt, where each decode step writes its
        position before attending up to it; the padded prefill's filler rows write only the
        scratch slot."""
        n, width = ids.shape
        step = _Step(self.k, self.v, False, rows)
        mask = torch.ones((n, 1, 1, 1), dtype=torch.bool, device=self.device)  # unused: causal in-kernel
        hidden = self.body(input_ids=ids, position_ids=self._cols[:width].expand(n, width), attention_mask=mask,
                           use_cache=False, fp_step=step).last_hidden_state
        return self.lm_head(hidden[torch.arange(n, device=self.device), last])

    def _padded_ids(self, group: list[EngineSequence], rows: int, width: int) -> torch.Tensor:
        """The group's prompts right-padded into a [rows, width] host tensor (causal attention
        never looks past a row's end)."""
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(group):
            prompt = s.all_ids
            ids[i, :len(prompt)] = torch.tensor(prompt)
        return ids

    def _capture_prefill_graphs(self) -> None:
        """Capture the padded prefill for every bucket (warm-up): one graph per (rows, width)."""
        rows = 1
        while rows <= PREFILL_GRAPH_ROWS:
            for width in PREFILL_GRAPH_WIDTHS:
                if width <= self.context_length and rows * width <= PREFILL_GRAPH_TOKENS:
                    try:
                        self._prefill_graphs[(rows, width)] = _PaddedPrefill(self, rows, width, capture=True)
                    except RuntimeError as exc:  # a model whose prefill cannot be captured: eager, as before
                        log.warning("prefill graphs off: capturing (%d rows, %d tokens) failed: %s", rows, width, exc)
                        self._prefill_graphs.clear()
                        self.padded_prefill = False
                        return
            rows *= 2
        log.info("prefill graphs: %d captured", len(self._prefill_graphs))

    def _prefill_logits(self, group: list[EngineSequence]) -> torch.Tensor:
        """One batched prefill forward (prompts right-padded to the longest): their keys and values
        into their slots, the logits of each prompt's last position."""
        width = max(len(s.all_ids) for s in group)
        ids = self._padded_ids(group, len(group), width)
        ids = ids.to(self.device, non_blocking=True)
        return self._prefill_forward(ids, self._to_device([s.slot for s in group]),
                                     self._to_device([len(s.all_ids) - 1 for s in group]))

    def prefill_chunk(self, seq: EngineSequence, start: int, end: int) -> int | None:
        """Prefill positions [start, end) of a long prompt (its slot reserved); the first token when
        this chunk ends the prompt, else None. A decode step for the running rows may run in
        between; it also writes a (discarded) key and value into this row, at the row's decode
        position - kept at `end`, where the next chunk writes, so the prefix is never touched."""
        ids = self._to_device(seq.all_ids[start:end])[None]
        rows = self._to_device([seq.slot])
        step = _Step(self.k, self.v, False, rows, start=start)
        mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)  # unused: built in-kernel
        hidden = self.body(input_ids=ids, position_ids=self._cols[start:end][None], attention_mask=mask,
                           use_cache=False, fp_step=step).last_hidden_state
        self._pos[seq.slot] = end
        if end < len(seq.all_ids):
            return None
        return self._sample(self.lm_head(hidden[:, -1]), [seq])[0]

    def _decode_forward(self, n: int, length: int) -> torch.Tensor:
        positions = self._pos[:n]
        mask = (self._cols[:length][None, :] <= positions[:, None])[:, None, None, :]
        splits = 0
        if self.live_prefix_attention:
            splits = decode_attention.choose_splits(n, self.k[0].shape[1], length, self._programs_wanted)
        step = _Step(self.k, self.v, True, self._rows[:n], positions, length, splits=splits)
        hidden = self.body(input_ids=self._ids[:n], position_ids=positions[:, None], attention_mask=mask,
                           use_cache=False, fp_step=step).last_hidden_state
        return self.lm_head(hidden[:, -1])

    def _graph(self, n: int, length: int):
        key = (n, length, self.live_prefix_attention, self.fused.active)
        entry = self._graphs.get(key)
        if entry is None:
            # Warm-up runs write the same keys/values the real step will: harmless to live slots.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_forward(n, length)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()  # an error of the warm-up surfaces here, not inside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self._decode_forward(n, length)
            entry = self._graphs[key] = (graph, out)
        return entry

    def decode(self, seqs: list[EngineSequence]) -> list[int]:
        return self.collect(self.launch(seqs))

    def launch(self, seqs: list[EngineSequence]) -> "_DecodeStep":
        """A decode step from the host's view of the sequences (their last tokens and positions)."""
        slots = [s.slot for s in seqs]
        n = _bucket(max(slots) + 1, self.max_batch_size)
        ids = [0] * n
        pos = [0] * n
        for s in seqs:
            ids[s.slot] = s.generated[-1]
            pos[s.slot] = len(s.prompt_ids) + len(s.generated) - 1
        for s in self._prefilling:  # rows half prefilled: the step's discarded write goes past their prefix
            if s.slot < n:
                pos[s.slot] = s.prefilled
        for s in self._joining_seqs():  # rows prefilled beside this step: likewise (see prefill_beside)
            if s.slot is not None and s.slot < n:
                pos[s.slot] = len(s.all_ids)
        self._ids[:n, 0].copy_(torch.tensor(ids, pin_memory=self._pinned), non_blocking=True)
        self._pos[:n].copy_(torch.tensor(pos, pin_memory=self._pinned), non_blocking=True)
        return self._run_step(seqs, slots, n, max(pos) + 1, offset=0)

    def _to_device(self, values: "list | np.ndarray", dtype=torch.long) -> torch.Tensor:
        """A small host list or array on the device without waiting for the device: torch.tensor(...,
        device=cuda) copies from pageable memory, which waits for every kernel queued before it -
        the step in flight - and would undo the pipelining."""
        if isinstance(values, np.ndarray):
            # torch.tensor(ndarray, pin_memory=True) refuses numpy input ("Can't pin tensor
            # constructed from numpy"): wrap the array, then copy it into pinned memory.
            host = torch.from_numpy(values).to(dtype)
            host = host.pin_memory() if self._pinned else host
        else:
            host = torch.tensor(values, dtype=dtype, pin_memory=self._pinned)
        return host.to(self.device, non_blocking=True)

    def launch_next(self, step: "_DecodeStep", seqs: list[EngineSequence],
                    joining: "_SidePrefill | None" = None) -> "_DecodeStep | None":
        """The step after `step`, fed on the device with the tokens `step` sampled (not yet on the
        host): the GPU runs it while the host detokenises `step`. Only steps sampled on the device
        (`step.tokens`) can be followed this way. `joining`: rows prefilled beside, whose first
        tokens (also on the device) are their input at this step; their positions were set when
        their prefill was queued."""
        if step.tokens is None or not seqs:
            return None
        if len(seqs) != len(step.seqs):  # rows that ended (or end at `step`) are left out
            members = {id(s) for s in seqs}
            keep = [i for i, s in enumerate(step.seqs) if id(s) in members]
        else:
            keep = None
        slots = [step.slots[i] for i in keep] if keep is not None else step.slots
        tokens = step.tokens if keep is None else step.tokens[self._to_device(keep)]
        rows = self._to_device(slots)
        self._ids[rows, 0] = tokens
        self._pos[rows] += 1
        if joining is not None:
            live = [i for i, s in enumerate(joining.seqs) if not s.done]
            if live:
                if joining.done is not None:  # this step reads their keys and values
                    torch.cuda.current_stream().wait_event(joining.done)
                    joining.tokens.record_stream(torch.cuda.current_stream())
                first = joining.tokens if len(live) == len(joining.seqs) else joining.tokens[self._to_device(live)]
                self._ids[self._to_device([joining.slots[i] for i in live]), 0] = first
                seqs = seqs + [joining.seqs[i] for i in live]
                slots = slots + [joining.slots[i] for i in live]
        top = max(len(s.prompt_ids) + len(s.generated) for s in seqs)  # the new input's position, + 1
        n = _bucket(max(slots) + 1, self.max_batch_size)
        return self._run_step(seqs, slots, n, top + 1, offset=1)

    def _run_step(self, seqs: list[EngineSequence], slots: list[int], n: int, length: int,
                  offset: int) -> "_DecodeStep":
        length = _bucket(length, self.context_length, MIN_LENGTH_BUCKET)
        if self.use_graphs:
            graph, out = self._graph(n, length)
            graph.replay()
            logits = out
        else:
            logits = self._decode_forward(n, length)
        logits = logits[self._to_device(slots)]
        step = _DecodeStep(seqs, slots)
        if offset == 0 and any(s.needs_host for s in seqs):
            step.ids = self._sample(logits, seqs)  # host work between steps (grammar, logprobs, ...)
            return step
        step.tokens = self._sample_on_device(logits, seqs, offset)
        step.host = torch.empty(len(seqs), dtype=torch.long, pin_memory=self._pinned)
        step.host.copy_(step.tokens, non_blocking=True)
        if self.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record()
        return step

    def collect(self, step: "_DecodeStep") -> list[int]:
        if step.ids is None:
            if step.event is not None:
                step.event.synchronize()  # this step's tokens only: a step launched after it runs on
            step.ids = step.host.tolist()
        return step.ids

    def release(self, seqs: list[EngineSequence]) -> None:
        for s in seqs:
            if isinstance(s.slot, int):
                heapq.heappush(self._free, s.slot)
                s.slot = None

    def gpu_memory_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0

    def warm_up(self) -> None:
        # Inference mode as the serving loop runs (worker._run_engine): the fused pieces are
        # compiled per grad mode, and a piece compiled for the other mode would compile again on
        # the first busy step.
        with torch.inference_mode():
            self._warm_up()

    def _warm_up(self) -> None:
        super().warm_up()
        if self.fused.active:
            # Compile the fused pieces for prompts of several rows now, through the engine's own
            # prefill (the generation above compiled them for one row; a batch of prompts would
            # otherwise run its rotary embedding uncompiled - positions of several rows are a shape
            # of their own - after the stance below, or compile on a busy step before it).
            probe = Generate(id=-1, prompt="", params=SamplingParams(max_tokens=1, temperature=0.0))
            rows = [EngineSequence(probe, [self.pad_id] * 3, IncrementalDetokenizer(self.detokenize))
                    for _ in range(min(2, self.max_batch_size))]  # one slot: prompts never come several at once
            self.prefill(rows)
            self.release(rows)
        if self.use_graphs:
            # Capture the common decode graphs now rather than on the first busy step.
            n = 1
            while True:
                for length in (MIN_LENGTH_BUCKET, 128, 256, 512):
                    if length <= self.context_length:
                        self._graph(n, length)
                if n >= self.max_batch_size:
                    break
                n = min(n * 2, self.max_batch_size)
            if self.padded_prefill:
                self._capture_prefill_graphs()
            torch.cuda.synchronize()
        if self.fused.active:
            # From here on a shape the warm-up did not compile runs uncompiled rather than
            # stalling every running stream for seconds while inductor compiles it.
            torch.compiler.set_stance("eager_on_recompile")

    # --- constraints and sampling ----------------------------------------------------------------
    def _ll_tokenizer(self):
        """llguidance's view of our tokenizer (built on first use: about a second; it also gives
        each token's exact bytes for logprobs)."""
        if self._lltok is None:
            import llguidance.hf

            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                       eos_token=sorted(self.eos_ids))
        return self._lltok

    def _ll_executor(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def make_matcher(self, grammar: str):
        import llguidance

        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"the output format cannot be enforced: {matcher.get_error()}",
                               param="response_format")
        return matcher

    def check_params(self, req: Generate) -> None:
        for token_id in req.params.logit_bias:
            if not 0 <= token_id < self.vocab_size:
                raise RequestError(f"logit_bias names token {token_id}, outside this model's vocabulary "
                                   f"(0..{self.vocab_size - 1})", param="logit_bias")

    def _token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes_of.get(token_id)
        if cached is None:
            cached = self._bytes_of[token_id] = self._ll_tokenizer().decode_bytes([token_id])
        return cached

    def _shape_logits(self, logits: torch.Tensor, seqs: list[EngineSequence]) -> None:
        """In place, for the rows that ask: frequency/presence penalties over the tokens generated
        so far, EOS held back until min_tokens, logit_bias, and the grammar's mask (last: nothing
        may re-allow a masked token)."""
        d = self.device
        penalised = [i for i, s in enumerate(seqs)
                     if (s.params.presence_penalty or s.params.frequency_penalty) and s.generated]
        if penalised:
            counts = torch.zeros((len(penalised), logits.shape[-1]), dtype=torch.float32)
            for j, i in enumerate(penalised):
                ids = torch.tensor(seqs[i].generated, dtype=torch.long)
                counts[j].index_add_(0, ids, torch.ones(len(ids)))
            counts = counts.to(d)
            freq = torch.tensor([seqs[i].params.frequency_penalty for i in penalised], device=d)[:, None]
            pres = torch.tensor([seqs[i].params.presence_penalty for i in penalised], device=d)[:, None]
            rows = torch.tensor(penalised, device=d)
            logits[rows] -= (freq * counts + pres * (counts > 0)).to(logits.dtype)
        early = [i for i, s in enumerate(seqs) if len(s.generated) < s.params.min_tokens]
        if early:  # min_tokens: EOS may not be sampled yet
            rows = torch.tensor(early, device=d)[:, None]
            logits[rows, self._eos_tensor[None, :]] = float("-inf")
        for i, s in enumerate(seqs):
            if s.params.logit_bias:
                ids = torch.tensor(list(s.params.logit_bias), dtype=torch.long, device=d)
                logits[i, ids] += torch.tensor(list(s.params.logit_bias.values()), device=d).to(logits.dtype)
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            words = (logits.shape[-1] + 31) // 32
            bitmask = torch.empty((len(constrained), words), dtype=torch.int32, pin_memory=self._pinned)
            if len(constrained) == 1 or not self._parallel_masks:
                for j, i in enumerate(constrained):
                    seqs[i].matcher.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), words * 4)
            else:  # llguidance computes the rows' masks on its own threads, without the GIL
                self._ll_executor().unsafe_compute_mask_ptr([(seqs[i].matcher, j) for j, i in enumerate(constrained)],
                                                            bitmask.data_ptr(), words * 4, len(constrained))
            # bits -> booleans through a 256 x 8 table: one gather instead of shift, and, compare
            packed = bitmask.to(self.device, non_blocking=True).view(torch.uint8).long()
            allowed = self._bit_table[packed].view(len(constrained), -1)[:, :logits.shape[-1]]
            if len(constrained) == logits.shape[0]:
                logits.masked_fill_(~allowed, float("-inf"))
            else:
                rows = torch.tensor(constrained, device=d)
                logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

    def _record_logprobs(self, raw_logprobs: torch.Tensor, chosen: list[int], seqs: list[EngineSequence],
                         want: list[int]) -> None:
        top_k = max(seqs[i].params.logprobs for i in want)
        rows = raw_logprobs[torch.tensor(want, device=raw_logprobs.device)]
        picked = rows.gather(1, torch.tensor([[chosen[i]] for i in want], device=rows.device)).squeeze(1).tolist()
        top_values, top_ids = rows.topk(top_k, dim=-1) if top_k else (None, None)
        top_values = top_values.tolist() if top_k else None
        top_ids = top_ids.tolist() if top_k else None
        for j, i in enumerate(want):
            k = seqs[i].params.logprobs
            top = [(self._token_bytes(t), v) for t, v in zip(top_ids[j][:k], top_values[j][:k])] if k else []
            seqs[i].logprob = TokenLogprob(self._token_bytes(chosen[i]), picked[j], top)

    def _sample_on_device(self, logits: torch.Tensor, seqs: list[EngineSequence], offset: int) -> torch.Tensor:
        """Token ids as a device tensor; `offset`: tokens sampled but not yet in `generated` (the
        noise position is the token's index within the completion: resume-stable)."""
        params = [s.params for s in seqs]
        if not any(p.temperature > 0 for p in params):
            return logits.argmax(dim=-1)
        # the rows' temperatures, top-p values and uniform numbers in one copy to the device
        per_row = np.empty((3, len(seqs)), dtype=np.float32)
        per_row[0] = [p.temperature for p in params]
        per_row[1] = [p.top_p for p in params]
        per_row[2] = sampling.row_uniform([s.seed for s in seqs], [len(s.generated) + offset for s in seqs])
        temperature, top_p, uniform = self._to_device(per_row, torch.float32)
        return sampling.sample(logits, temperature, top_p, uniform, True, any(p.top_p < 1 for p in params))

    def _sample(self, logits: torch.Tensor, seqs: list[EngineSequence]) -> list[int]:
        """Token ids on the host, after the host-side work some rows need (logits shaping, logprobs)."""
        want_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs >= 0]
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if want_logprobs else None
        if any(s.shapes_logits for s in seqs):
            self._shape_logits(logits, seqs)
        chosen = self._sample_on_device(logits, seqs, 0).tolist()
        if want_logprobs:
            self._record_logprobs(raw_logprobs, chosen, seqs, want_logprobs)
        return chosen
