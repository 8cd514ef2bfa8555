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


def token_keys(vocab: int, device) -> torch.Tensor:
    """Each token id's term of the noise's hash ([vocab] int64). A tensor, not index arithmetic,
    so that a compiled sampler does the 64-bit multiplication on loaded values (inductor would
    fold an arange into 32-bit index maths, where the constant does not fit)."""
    return torch.arange(vocab, device=device, dtype=torch.int64) * _M3


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int,
                  keys: torch.Tensor | None = None) -> torch.Tensor:
    """U(0,1) of shape [rows, vocab], a pure function of (seed, position, token id); `keys`:
    token_keys(vocab) when the caller has them."""
    base = _mix(seeds * _M1 + positions * _M2)  # [rows]
    if keys is None:
        keys = token_keys(vocab, seeds.device)
    bits = _mix(base[:, None] + keys[None, :])
    mantissa = (bits >> 11) & ((1 << 53) - 1)
    return (mantissa.to(torch.float64) + 0.5) / float(1 << 53)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
           positions: torch.Tensor, any_sampled: bool, any_top_p: bool, without_top_p=None,
           keys: torch.Tensor | None = None) -> torch.Tensor:
    """logits [rows, vocab]; temperature, top_p [rows] float; seeds, positions [rows] int64.
    Rows with temperature 0 decode greedily. Returns token ids [rows] (on the logits' device).
    `without_top_p`: sample_without_top_p as the caller runs it (the engine compiles it on CUDA);
    `keys`: token_keys(vocab), when the caller keeps them."""
    if not any_sampled:
        return logits.argmax(dim=-1)
    if keys is None:
        keys = token_keys(logits.shape[-1], logits.device)
    if not any_top_p:
        return (without_top_p or sample_without_top_p)(logits, temperature, seeds, positions, keys)
    logprobs = _logprobs(logits, temperature)
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    drop = (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keep the smallest set reaching top_p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    logprobs = torch.full_like(logprobs, float("-inf")).scatter_(1, order, sorted_lp)
    return _pick(logits, logprobs, temperature, seeds, positions, keys)


def sample_without_top_p(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                         positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`sample` for a batch without top_p: elementwise over the vocabulary and two reductions, which
    torch.compile fuses into a pass or two over the logits (eagerly the noise alone is some thirty
    full-vocabulary int64 passes per step)."""
    return _pick(logits, _logprobs(logits, temperature), temperature, seeds, positions, keys)


def _logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature.clamp_min(1e-6)[:, None], dim=-1)


def _pick(logits, logprobs, temperature, seeds, positions, keys) -> torch.Tensor:
    """Gumbel-max over `logprobs` with the counter-based noise; greedy where temperature is 0."""
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, logits.shape[-1], keys))).to(logprobs.dtype)
    sampled = (logprobs + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, logits.argmax(dim=-1))
