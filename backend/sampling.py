"""Batched sampling on the model's device: greedy, temperature, top-p and per-request seeds in a
few tensor operations for the whole batch.

Sampled tokens use the Gumbel-max trick with noise from a counter-based hash of (seed, position,
token id): no generator state, so any worker draws the same token for the same request at the
same position (a generation resumed on another worker continues exactly), and rows with and
without seeds mix freely in one batch.
"""

from __future__ import annotations

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


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) of shape [rows, vocab], a pure function of (seed, position, token id)."""
    base = _mix(seeds * _M1 + positions * _M2)  # [rows]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix(base[:, None] + ids[None, :] * _M3)
    mantissa = (bits >> 11) & ((1 << 53) - 1)
    return (mantissa.to(torch.float64) + 0.5) / float(1 << 53)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
           positions: torch.Tensor, any_sampled: bool, any_top_p: bool) -> torch.Tensor:
    """logits [rows, vocab]; temperature, top_p [rows] float; seeds, positions [rows] int64.
    Rows with temperature 0 decode greedily. Returns token ids [rows] (on the logits' device)."""
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    if any_top_p:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        drop = (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keep the smallest set reaching top_p
        sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
        logprobs = torch.full_like(logprobs, float("-inf")).scatter_(1, order, sorted_lp)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, logits.shape[-1]))).to(logprobs.dtype)
    sampled = (logprobs + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)
