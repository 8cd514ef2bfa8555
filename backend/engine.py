"""The transformers engine: the only module that imports torch and transformers.

Continuous batching over a padded KV cache (transformers' DynamicCache): every step decodes all
running sequences together; new requests are prefilled (batched, left-padded) between steps and their
cache rows merged into the running batch; finished or cancelled rows are dropped at once. Replace
`prefill`/`decode` to change the decode strategy: the request lifecycle lives in BatchEngine.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from backend.manifest import ManifestError, has_manifest, verify_manifest
from backend.protocol import Generate, WorkerSettings
from backend.scheduler import BatchEngine, RequestError, Sequence_

log = logging.getLogger("fullpower.worker")


class BootError(Exception):
    """The engine cannot start (bad model, manifest mismatch, unusable device)."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise BootError(f"unknown dtype {name!r}") from None


class TransformersEngine(BatchEngine):
    name = "transformers"

    def __init__(self, settings: WorkerSettings) -> None:
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
        dtype = resolve_dtype(settings.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        config = self.model.config
        eos = set()
        for source in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        context = getattr(config, "max_position_embeddings", None) or 2048
        super().__init__(settings.max_batch_size, context, sorted(eos))
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either version.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._rows: list[Sequence_] = []  # cache row i belongs to _rows[i]
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached length]; 0 = left padding

    # --- tokens ---------------------------------------------------------------------------------
    def encode(self, req: Generate) -> list[int]:
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in req.messages]
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as exc:  # a template that rejects the conversation (e.g. role order)
                raise RequestError(f"messages: {exc}") from exc
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer(req.prompt or "").input_ids) or [self.pad_id]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- model ----------------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence_]) -> list[int]:
        inputs = [s.all_ids for s in seqs]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        for s in seqs:
            s.slot = self._generator(s)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        self._merge(seqs, cache, mask)
        return self._sample(out.logits[:, -1, :], seqs)

    def decode(self, seqs: list[Sequence_]) -> list[int]:
        rows = self._rows
        last = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=last, attention_mask=self._mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: self._cache})
        tokens = self._sample(out.logits[:, -1, :], rows)
        by_seq = {id(s): t for s, t in zip(rows, tokens)}
        return [by_seq[id(s)] for s in seqs]

    def release(self, seqs: list[Sequence_]) -> None:
        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self._rows) if id(s) not in gone]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        # Drop cache columns that are padding in every remaining row.
        leading = int((self._mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        if leading:
            self._mask = self._mask[:, leading:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, leading:, :]
                layer.values = layer.values[:, :, leading:, :]

    def _merge(self, seqs: list[Sequence_], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, list(seqs)
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)], dim=0)
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)], dim=0)
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)], dim=0)
        self._rows.extend(seqs)

    # --- sampling -------------------------------------------------------------------------------
    def _generator(self, seq: Sequence_) -> torch.Generator | None:
        p = seq.params
        if p.temperature <= 0:
            return None
        gen = torch.Generator(device=self.device)
        if p.seed is None:
            gen.seed()
        return gen

    @staticmethod
    def _step_seed(seed: int, position: int) -> int:
        # Seeded sampling draws token i from a generator seeded with (seed, i), not from one stream
        # of random numbers: a generation resumed on another worker at position i continues
        # exactly as the first worker would have.
        return (seed * 1_000_003 + position * 7_919 + 0x5DEECE66D) % (2**63)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence_]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature <= 0 or s.slot is None:
                out.append(greedy[i])
                continue
            row = logits[i].float() / p.temperature
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                cumulative = sorted_probs.cumsum(-1)
                cut = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
                sorted_probs[cut] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            if p.seed is not None:
                s.slot.manual_seed(self._step_seed(p.seed, len(s.generated)))
            out.append(int(torch.multinomial(probs, 1, generator=s.slot)))
        return out
