"""torch.compile for the engine's small fused pieces (backend/fused.py, backend/fp8.py): specialised
on every size except the rows.

Why not `dynamic=True`: it makes every size symbolic, the model's widths included, and inductor
can then prove nothing about a row's alignment - a row of a [rows, 4096] tensor starts at
`row * s1`, a slice of stacked gate/up at `row * 2 * s1 + s1` - so its kernels load element by
element instead of 16 bytes at a time. On the H100 the fp8 activation compiled that way took
31 us per 8B layer for ~10 us of memory traffic (docs/benchmarks.md section 18). The widths of a
model never change, the rows (batch size, prompt length) always do: so the rows are marked
dynamic on each call and everything else is a constant of the compiled kernel. A model with two
widths gets one compilation per width; a dimension of size 1 is specialised by torch (one more
compilation, e.g. for the decode step's sequence length of 1).
"""

from __future__ import annotations

import functools

import torch

# Every size dynamic, as before the widths were made static: only for measuring one against the
# other in one lease (bench_gpu --dynamic-widths). Read when a piece is compiled.
all_sizes_dynamic = False

# How many compilations of one function torch keeps before it raises: one per width and per
# pattern of size-1 dimensions, per model shape where a process builds several engines (the GPU
# benchmark does) - more than torch's default of 8.
_RECOMPILE_LIMIT = 64


def compile_rows(fn, row_args: tuple[int, ...] = (0,), backend="inductor", options=None):
    """fn compiled whole (fullgraph: a piece that does not compile whole is an error, not a silent
    slow path), dynamic only in the rows: every dimension but the last of the positional tensor
    arguments at `row_args` (their other tensors - weights, scales per column - and their ints are
    constants of the compilation)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    if all_sizes_dynamic:
        return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend, options=options)
    compiled_fn = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend, options=options)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        for index in row_args:
            if index < len(args):
                tensor = args[index]
                for dim in range(tensor.dim() - 1):
                    # "maybe": a dimension of size 1 is specialised rather than refused
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled_fn(*args, **kwargs)

    return call
