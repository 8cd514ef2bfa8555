"""Triton kernels for two small pieces of every layer of a decode step: the rotary embedding of q
and k, and the write of the step's keys and values into the slot KV cache (and, not used by
default, fp8's SiLU-times-up quantiser in one pass: `silu_mul_quantize`).

Why: on the H100 the 8B shape's captured fp8 decode step spent ~19 us per layer on these two
pieces (docs/benchmarks.md section 18) for ~5 MB of memory traffic:
- the rotary embedding, compiled by inductor (backend/fused.py), took 7.2 + 2.3 us: q and k are
  column views of the stacked q/k/v product, whose row stride torch makes a symbol of when the rows
  are dynamic, so inductor cannot prove a row's start aligned and loads element by element. A
  Triton kernel's integer arguments are specialised by value (divisible by 16 or not), so the
  same strides passed here give aligned, vectorised loads;
- the cache write `k_cache[rows, :, positions] = key` is an index_put per tensor (4.6 us each),
  two per layer. One kernel writes both.

Both compute exactly what they replace: the write is a copy, and the rotary rounds to the model's
dtype after each product and after the sum as transformers' op-by-op code does (no fused
multiply-add: `enable_fp_fusion=False`), so greedy output stays HF generate's.

Used on CUDA (inside the captured decode graphs). On the CPU they run under Triton's interpreter
(TRITON_INTERPRET=1), which is how CI checks them; elsewhere the engine keeps the torch code.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the engine keeps the torch code
    triton = None

# Under the interpreter the kernels run on CPU tensors (tests); otherwise only on CUDA ones.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# The torch code instead, everywhere: only for measuring one against the other in one lease
# (bench_gpu --torch-layer-pieces). Read when a step is traced or captured.
enabled = True


def usable(tensor: torch.Tensor) -> bool:
    """Whether these kernels can run on this tensor's device (each `*_fits` asks it first)."""
    return enabled and triton is not None and (tensor.is_cuda or (_INTERPRETED and tensor.device.type == "cpu"))


if triton is not None and _INTERPRETED:
    # The interpreter has no libdevice; numpy's exp and division stand in (checked against torch
    # within a rounding step; bit for bit on the GPU by loadtest/gpu_kernels_check.py).
    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _div(a, b):
        return a / b
elif triton is not None:
    @triton.jit
    def _exp(x):
        return libdevice.exp(x)  # CUDA's expf, as torch's SiLU uses (tl.exp is an approximation)

    @triton.jit
    def _div(a, b):
        return libdevice.div_rn(a, b)  # IEEE division, as CUDA's `/` (Triton's is approximate)


if triton is not None:

    @triton.jit
    def _rounded(x, like):
        """x (float32) rounded to like's dtype and back, as an op of torch in that dtype leaves it."""
        return x.to(like.dtype, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _rotate(x_ptr, out_ptr, x_row, x_head, x_pos, out_row, out_head, out_pos, row, pos, c1, s1, c2, s2,
                HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, HALF)
        live = heads[:, None] < HEADS
        src = x_ptr + row * x_row + pos * x_pos + heads[:, None] * x_head + dims[None, :]
        x1 = tl.load(src, mask=live, other=0.0)
        x2 = tl.load(src + HALF, mask=live, other=0.0)
        # transformers: q * cos + rotate_half(q) * sin, each product and the sum rounded to the
        # dtype (to nearest, ties to even, as torch rounds); rotate_half(q) = (-x2, x1)
        first = _rounded(_rounded(x1.to(tl.float32) * c1, x1) + _rounded(-x2.to(tl.float32) * s1, x1), x1)
        second = _rounded(_rounded(x2.to(tl.float32) * c2, x1) + _rounded(x1.to(tl.float32) * s2, x1), x1)
        dst = out_ptr + row * out_row + pos * out_pos + heads[:, None] * out_head + dims[None, :]
        tl.store(dst, first.to(x1.dtype), mask=live)
        tl.store(dst + HALF, second.to(x1.dtype), mask=live)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                       q_row, q_head, q_pos, k_row, k_head, k_pos, cs_row, cs_pos,
                       qo_row, qo_head, qo_pos, ko_row, ko_head, ko_pos, positions,
                       HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS: tl.constexpr,
                       KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
        token = tl.program_id(0)  # one (row, position) of q and k: all their heads
        row = token // positions
        pos = token % positions
        dims = tl.arange(0, HALF)
        cs = row * cs_row + pos * cs_pos + dims
        c1 = tl.load(cos_ptr + cs).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + cs + HALF).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + cs).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + cs + HALF).to(tl.float32)[None, :]
        _rotate(q_ptr, q_out_ptr, q_row, q_head, q_pos, qo_row, qo_head, qo_pos, row, pos, c1, s1, c2, s2,
                HEADS, HEADS_PAD, HALF)
        _rotate(k_ptr, k_out_ptr, k_row, k_head, k_pos, ko_row, ko_head, ko_pos, row, pos, c1, s1, c2, s2,
                KV_HEADS, KV_HEADS_PAD, HALF)

    @triton.jit
    def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, positions_ptr,
                         key_row, key_head, value_row, value_head,
                         kc_slot, kc_head, kc_pos, vc_slot, vc_head, vc_pos,
                         KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0)  # one row of the step: its key and value for every head
        slot = tl.load(slots_ptr + row)
        pos = tl.load(positions_ptr + row)
        heads = tl.arange(0, KV_HEADS_PAD)
        dims = tl.arange(0, DIM)
        live = heads[:, None] < KV_HEADS
        key = tl.load(key_ptr + row * key_row + heads[:, None] * key_head + dims[None, :], mask=live)
        value = tl.load(value_ptr + row * value_row + heads[:, None] * value_head + dims[None, :], mask=live)
        tl.store(k_cache_ptr + slot * kc_slot + pos * kc_pos + heads[:, None] * kc_head + dims[None, :], key,
                 mask=live)
        tl.store(v_cache_ptr + slot * vc_slot + pos * vc_pos + heads[:, None] * vc_head + dims[None, :], value,
                 mask=live)

    @triton.jit
    def _silu_mul_quantize_kernel(gate_up_ptr, out_ptr, scale_ptr, gate_up_row, out_row, reciprocal_of_max,
                                  min_amax, fp8_max, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one row, whole: read once, its amax and its quantised values
        cols = tl.arange(0, BLOCK)
        live = cols < WIDTH
        gate = tl.load(gate_up_ptr + row * gate_up_row + cols, mask=live, other=0.0)
        up = tl.load(gate_up_ptr + row * gate_up_row + WIDTH + cols, mask=live, other=0.0)
        # torch's eager code, operation for operation (backend/fp8.py silu_mul_quantize): SiLU in
        # float32 as x / (1 + exp(-x)) with IEEE division and libdevice's exp (CUDA's expf), rounded
        # to the dtype; times up, rounded; the row's amax clamped, times the reciprocal of the float8
        # maximum (torch divides by a scalar that way); the values divided by the scale, clamped,
        # converted to nearest (even).
        g = gate.to(tl.float32)
        silu = _rounded(_div(g, 1.0 + _exp(-g)), up)
        act = _rounded(silu * up.to(tl.float32), up)
        amax = tl.max(tl.where(live, tl.abs(act), 0.0), 0)
        scale = tl.maximum(amax, min_amax) * reciprocal_of_max
        quantised = tl.minimum(tl.maximum(_div(act, scale), -fp8_max), fp8_max)
        tl.store(out_ptr + row * out_row + cols, quantised.to(out_ptr.dtype.element_ty), mask=live)
        tl.store(scale_ptr + row, scale)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def rotary_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether `rotary` runs here and computes transformers' rotate-half embedding for these
    arguments: q and k of [rows, heads, positions, dim] (unsqueeze_dim 1), cos and sin of [rows,
    positions, dim] in their dtype, a power-of-two head dim, the last dim of each contiguous."""
    if not usable(q) or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    rows, _, positions, dim = q.shape
    return (k.shape[0] == rows and k.shape[2:] == (positions, dim) and cos.shape == (rows, positions, dim)
            and _power_of_two(dim) and dim >= 2 and q.dtype == k.dtype == cos.dtype == sin.dtype
            and all(t.stride(-1) == 1 for t in (q, k, cos, sin)) and cos.stride() == sin.stride())


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (rotate-half, unsqueeze_dim 1) in one kernel; call only
    where rotary_fits. The results have the layout transformers' would ([rows, positions, heads,
    dim] memory, seen as [rows, heads, positions, dim])."""
    rows, heads, positions, dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty((rows, positions, heads, dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    k_out = torch.empty((rows, positions, kv_heads, dim), dtype=k.dtype, device=k.device).transpose(1, 2)
    if rows * positions:
        _rotary_kernel[(rows * positions,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), cos.stride(0), cos.stride(1),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            positions,
            HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads), KV_HEADS=kv_heads,
            KV_HEADS_PAD=triton.next_power_of_2(kv_heads), HALF=dim // 2, num_warps=4, enable_fp_fusion=False)
    return q_out, k_out


def write_kv_fits(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether `write_kv` runs here and can take a decode step's key and value ([rows, kv_heads, 1,
    dim]) into these caches ([slots, kv_heads, positions, dim])."""
    return (usable(key) and key.dim() == 4 and key.shape[2] == 1 and value.shape == key.shape and _power_of_two(key.shape[3])
            and key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
            and all(t.stride(3) == 1 for t in (key, value, k_cache, v_cache)))


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, positions: torch.Tensor) -> None:
    """k_cache[slots, :, positions] = key[:, :, 0] and the same for value, in one kernel.
    key/value [rows, kv_heads, 1, dim]; caches [slots, kv_heads, positions, dim]."""
    rows, kv_heads, _, dim = key.shape
    if not rows:
        return
    _write_kv_kernel[(rows,)](
        key, value, k_cache, v_cache, slots, positions,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_HEADS=kv_heads, KV_HEADS_PAD=triton.next_power_of_2(kv_heads), DIM=dim, num_warps=4)


def silu_mul_quantize_fits(gate_up: torch.Tensor, width: int) -> bool:
    """Whether `silu_mul_quantize` runs here and takes these stacked gate/up rows ([rows, 2 * width],
    half precision, each row contiguous)."""
    return (usable(gate_up) and gate_up.dim() == 2 and gate_up.shape[1] == 2 * width and gate_up.stride(1) == 1
            and gate_up.dtype in (torch.bfloat16, torch.float16) and width <= 65536)


@functools.cache
def _fp8_max_and_reciprocal(fp8_dtype: torch.dtype) -> tuple[float, float]:
    """The float8 type's maximum and its float32 reciprocal, as torch computes it for
    `tensor / python_float` on CUDA (once per type, not per call)."""
    fp8_max = torch.finfo(fp8_dtype).max
    return fp8_max, (torch.tensor(1.0, dtype=torch.float32) / torch.tensor(fp8_max, dtype=torch.float32)).item()


def silu_mul_quantize(gate_up: torch.Tensor, width: int, fp8_dtype: torch.dtype, min_amax: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """backend/fp8.py's silu_mul_quantize in one kernel, one program per row: (SiLU(gate) * up as
    float8 scaled per row, the [rows, 1] float32 scales). Inductor makes two kernels of it (the
    row's amax, then the values), each reading the whole gate/up product: 8.2 + 9.7 us per 8B layer
    on the H100 for what one pass reads in ~5."""
    rows = gate_up.shape[0]
    quantised = torch.empty((rows, width), dtype=fp8_dtype, device=gate_up.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=gate_up.device)
    if rows:
        fp8_max, reciprocal = _fp8_max_and_reciprocal(fp8_dtype)
        block = triton.next_power_of_2(width)
        _silu_mul_quantize_kernel[(rows,)](
            gate_up, quantised, scales, gate_up.stride(0), quantised.stride(0), reciprocal, min_amax, fp8_max,
            WIDTH=width, BLOCK=block, num_warps=max(4, min(16, block // 1024)), enable_fp_fusion=False)
    return quantised, scales
