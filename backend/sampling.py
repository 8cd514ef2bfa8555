"""Batched sampling on the model's device: greedy, temperature, top-p and per-request seeds in a
few tensor operations for the whole batch.

A sampled token is drawn by inverse transform: one uniform number per row, a counter-based hash of
(seed, position), is looked up in the cumulative sum of the row's probabilities (after temperature
and top-p). No generator state, so any worker draws the same token for the same request at the
same position (a generation resumed on another worker continues exactly), and rows with and
without seeds mix freely in one batch. The rows' numbers are hashed on the host (`row_uniform`,
numpy: the seeds and positions are host values anyway) and the engine uploads them with the
temperatures and top-p values in one copy: on the device each hash step would be a kernel of its
own, launched from Python every decode step.

Why not Gumbel-max (what this module did before): it needs a hashed noise value for every token of
every row, every step - on the H200 about 1.4 ms per step at 256 rows of a 49k vocabulary, more
than half of a small model's decode step (docs/benchmarks.md section 17). One number per row and a
softmax, a cumulative sum and a binary search are a few passes over the logits.
"""

from __future__ import annotations

import numpy as np
import torch

# splitmix64's constants (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (numpy's shifts are logical and its multiplication wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M2
    x = x ^ (x >> np.uint64(27))
    x = x * _M3
    return x ^ (x >> np.uint64(31))


def row_uniform(seeds, positions) -> np.ndarray:
    """U(0,1) per row ([rows] float64), a pure function of (seed, position) - int64 values, as
    lists or arrays; never 0 or 1."""
    with np.errstate(over="ignore"):
        seeds_u = np.asarray(seeds, dtype=np.int64).view(np.uint64)
        positions_u = np.asarray(positions, dtype=np.int64).view(np.uint64)
        bits = _mix(_mix(seeds_u * _M1 + positions_u * _M2) + _M3)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
           any_sampled: bool, any_top_p: bool) -> torch.Tensor:
    """logits [rows, vocab]; temperature, top_p [rows] float; uniform [rows] on the logits' device:
    each row's row_uniform(seed, position). Rows with temperature 0 decode greedily. Returns token ids [rows]
    (on the logits' device). A token whose probability is 0 (masked by a grammar, cut by top-p) is
    never drawn."""
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    probs = torch.softmax(logits.float() / temperature.clamp_min(1e-6)[:, None], dim=-1)
    order = None
    if any_top_p:  # keep the smallest set of most likely tokens reaching top_p (the first always)
        ranked, ranks = probs.sort(dim=-1, descending=True)
        ranked = ranked.masked_fill((ranked.cumsum(dim=-1) - ranked) > top_p[:, None], 0.0)
        # rows without top_p keep the vocabulary's order: a row's draw must not depend on whether
        # another row of its batch has top_p (a resumed generation continues in another batch)
        nucleus = (top_p < 1)[:, None]
        probs = torch.where(nucleus, ranked, probs)
        order = torch.where(nucleus, ranks, torch.arange(probs.shape[-1], device=probs.device))
    cdf = probs.cumsum(dim=-1)
    # u * total <= total in float32 too, so the search always lands on a token of the row
    target = (uniform.to(torch.float32) * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, target).clamp_max(probs.shape[-1] - 1)
    # a float32 sum computed in parallel may dip by an ulp where a probability is 0: never pick such
    # a token (a grammar forbids it), take the row's most likely one instead
    allowed = probs.gather(1, picked) > 0
    picked = torch.where(allowed, picked, probs.argmax(dim=-1, keepdim=True)).squeeze(1)
    if order is not None:
        picked = order.gather(1, picked[:, None]).squeeze(1)
    return torch.where(temperature > 0, picked, greedy)
