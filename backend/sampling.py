"""Batched sampling on the model's device: greedy, temperature, top-p and per-request seeds in a
few tensor operations for the whole batch.

A sampled token is drawn by inverse transform: one uniform number per row, a counter-based hash of
(seed, position), is looked up in the cumulative sum of the row's probabilities (after temperature
and top-p). No generator state, so any worker draws the same token for the same request at the
same position (a generation resumed on another worker continues exactly), and rows with and
without seeds mix freely in one batch. The engine hashes the rows' numbers on the host
(`row_uniform_host`, numpy: the seeds and positions are host values anyway) and uploads them with
the temperatures and top-p values in one copy: on the device each hash step would be a kernel of
its own, launched from Python every decode step.

Why not Gumbel-max (what this module did before): it needs a hashed noise value for every token of
every row, every step - on the H200 about 1.4 ms per step at 256 rows of a 49k vocabulary, more
than half of a small model's decode step (docs/benchmarks.md section 17). One number per row and a
softmax, a cumulative sum and a binary search are a few passes over the logits.
"""

from __future__ import annotations

import numpy as np
import torch

_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M3 = -7723592293110705685  # 0x94D049BB133111EB


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping multiplication, logical shifts emulated)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M2
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M3
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return x


def row_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """U(0,1) per row ([rows] float64), a pure function of (seed, position); never 0 or 1."""
    bits = _mix(_mix(seeds * _M1 + positions * _M2) + _M3)
    mantissa = (bits >> 11) & ((1 << 53) - 1)
    return (mantissa.to(torch.float64) + 0.5) / float(1 << 53)


_U64 = np.uint64


def _mix_host(x: np.ndarray) -> np.ndarray:
    """_mix on uint64 (numpy's shifts are logical and its multiplication wraps: the same bits)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(_M2 & (2**64 - 1))
    x = x ^ (x >> _U64(27))
    x = x * _U64(_M3 & (2**64 - 1))
    return x ^ (x >> _U64(31))


def row_uniform_host(seeds: list[int], positions: list[int]) -> np.ndarray:
    """row_uniform on the host, bit for bit ([rows] float64)."""
    with np.errstate(over="ignore"):
        seeds_u = np.array(seeds, dtype=np.int64).view(np.uint64)
        positions_u = np.array(positions, dtype=np.int64).view(np.uint64)
        bits = _mix_host(_mix_host(seeds_u * _U64(_M1 & (2**64 - 1)) + positions_u * _U64(_M2 & (2**64 - 1)))
                         + _U64(_M3 & (2**64 - 1)))
    return ((bits >> _U64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
           any_sampled: bool, any_top_p: bool) -> torch.Tensor:
    """logits [rows, vocab]; temperature, top_p [rows] float; uniform [rows]: each row's
    row_uniform(seed, position). Rows with temperature 0 decode greedily. Returns token ids [rows]
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
