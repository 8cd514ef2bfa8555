"""Decode attention that reads only each row's live prefix of the slot KV cache (Triton kernels).

Why a kernel of our own: the decode step's attention went through SDPA with a boolean mask over
the step's length bucket, so every row read the whole bucket of keys and values, the padded tail
included, and the query heads that share a key/value head (GQA) did not share its reads. On the
H200 that attention was most of the captured decode graph. Here one program handles one (row,
key/value head, split): it loads the query heads of that group together, walks the row's live
positions in blocks with an online softmax (fp32 accumulators), and so reads each live key and
value once. With few rows a row's positions are split over several programs (flash-decoding)
and a second kernel merges their partial results by their log-sum-exp.

Used only on CUDA with a half-precision model inside captured decode graphs (a Triton launch
costs tens of microseconds of host time; in a graph it costs nothing). Elsewhere the engine keeps
SDPA. On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1), which is how CI
checks them against SDPA without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses SDPA
    triton = None

BLOCK = 64  # positions per loop iteration
MIN_POSITIONS_PER_SPLIT = 256  # a split shorter than this costs more to merge than it saves


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def choose_splits(rows: int, kv_heads: int, length_bucket: int, programs_wanted: int) -> int:
    """Splits per row so that rows x kv_heads x splits reaches about `programs_wanted` (enough
    programs to fill the GPU), a power of two, each split covering at least a few blocks."""
    splits = 1
    most = max(1, length_bucket // MIN_POSITIONS_PER_SPLIT)
    while rows * kv_heads * splits < programs_wanted and splits * 2 <= most:
        splits *= 2
    return splits


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, lengths_ptr, out_ptr, lse_ptr,
                        q_row, q_head, k_row, k_head, k_pos, v_row, v_head, v_pos,
                        out_row, out_head, out_split, lse_row, lse_head,
                        scale,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lengths_ptr + row)
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        begin = split * per_split
        end = tl.minimum(begin + per_split, length)

        group = tl.arange(0, GROUP_PAD)
        in_group = group < GROUP
        heads = kv_head * GROUP + group
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * q_row + heads[:, None] * q_head + dims[None, :], mask=in_group[:, None],
                    other=0.0)
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = k_ptr + row * k_row + kv_head * k_head
        v_base = v_ptr + row * v_row + kv_head * v_head
        for start in range(begin, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            live = cols < end
            k = tl.load(k_base + cols[:, None] * k_pos + dims[None, :], mask=live[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(live[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * v_pos + dims[None, :], mask=live[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        # An empty split (a short row's later split) leaves total 0: it writes zeros and a
        # log-sum-exp of -inf, which the merge weighs by exp(-inf) = 0.
        safe_total = tl.where(total > 0, total, 1.0)
        out = acc / safe_total[:, None]
        out_ptrs = out_ptr + row * out_row + heads[:, None] * out_head + split * out_split + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
        if SPLITS > 1:
            lse = tl.where(total > 0, best + tl.log(safe_total), float("-inf"))
            tl.store(lse_ptr + row * lse_row + heads * lse_head + split, lse, mask=in_group)

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, out_ptr,
                      part_row, part_head, part_split, lse_row, lse_head, out_row, out_head,
                      HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS)
        dims = tl.arange(0, HEAD_DIM)
        lse = tl.load(lse_ptr + row * lse_row + head * lse_head + splits)
        weight = tl.exp(lse - tl.max(lse, 0))
        parts = tl.load(part_ptr + row * part_row + head * part_head + splits[:, None] * part_split + dims[None, :])
        out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(out_ptr + row * out_row + head * out_head + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, splits: int = 1) -> torch.Tensor:
    """query [rows, heads, 1, dim]; k_cache/v_cache [>= rows, kv_heads, positions, dim] (row r's
    live keys at positions 0 .. lengths[r]-1); returns [rows, 1, heads, dim], the layout the
    model's output projection takes."""
    rows, heads, _, dim = query.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty((rows, 1, heads, dim), dtype=query.dtype, device=query.device)
    if splits > 1:
        partial = torch.empty((rows, heads, splits, dim), dtype=torch.float32, device=query.device)
        lse = torch.empty((rows, heads, splits), dtype=torch.float32, device=query.device)
        target, t_row, t_head, t_split = partial, partial.stride(0), partial.stride(1), partial.stride(2)
    else:
        lse = out  # not written with one split
        target, t_row, t_head, t_split = out, out.stride(0), out.stride(2), 0
    _partial_kernel[(rows, kv_heads, splits)](
        query, k_cache, v_cache, lengths, target, lse,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        t_row, t_head, t_split, lse.stride(0), lse.stride(1) if splits > 1 else 0,
        scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_N=BLOCK,
        SPLITS=splits, num_warps=4)
    if splits > 1:
        _merge_kernel[(rows, heads)](
            partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(2),
            HEAD_DIM=dim, SPLITS=splits, num_warps=1)
    return out
