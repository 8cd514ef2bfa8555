"""On a GPU: backend/layer_kernels.py's rotary, KV-cache write and fp8 activation against the torch code they replace
- bit for bit in bfloat16 (CI checks them in float32 under Triton's interpreter, whose bfloat16
rounding is not the GPU's), and GPU time per call, each replayed in a CUDA graph as the decode step
runs them: transformers' eager rotary, the compiled one (backend/fused.py) and the kernel; two
index_put writes and the one kernel; fp8's eager SiLU-times-up quantiser, the compiled one and the
kernel.

    python -m loadtest.gpu_kernels_check --out reports/gpu-kernels-check.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from backend import layer_kernels
from backend.compiling import compile_rows
from backend.fp8 import FP8, _MIN_AMAX, silu_mul_quantize
from backend.fp8 import compiled as compiled_fp8_piece
from backend.fused import _rotary

# (name, heads, kv_heads, head dim, rows, positions): the 8B and 135M shapes' decode steps at 256
# rows, and a prompt of 128 positions
CASES = (("llama-3.1-8b decode", 32, 8, 128, 256, 1), ("smollm2-135m decode", 9, 3, 64, 256, 1),
         ("llama-3.1-8b prefill 8x128", 32, 8, 128, 8, 128))


def gpu_us(fn, replays: int = 50) -> float:
    """GPU time of one call of fn, replayed in a CUDA graph (no launch cost, as in the decode graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / replays / 10, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/gpu-kernels-check.json")
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    compiled_rotary = compile_rows(_rotary, (0, 1, 2, 3), options={"emulate_precision_casts": True})
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    ok = True
    for name, heads, kv_heads, dim, rows, positions in CASES:
        stacked = torch.randn(rows, positions, (heads + 2 * kv_heads) * dim, device=device).to(dtype)
        q = stacked[..., :heads * dim].view(rows, positions, heads, dim).transpose(1, 2)
        k = stacked[..., heads * dim:(heads + kv_heads) * dim].view(rows, positions, kv_heads, dim).transpose(1, 2)
        v = stacked[..., (heads + kv_heads) * dim:].view(rows, positions, kv_heads, dim).transpose(1, 2)
        angles = torch.randn(rows, positions, dim // 2, device=device) * 100
        cos = torch.cat((angles, angles), -1).cos().to(dtype)
        sin = torch.cat((angles, angles), -1).sin().to(dtype)
        theirs = apply_rotary_pos_emb(q, k, cos, sin)
        ours = layer_kernels.rotary(q, k, cos, sin)
        compiled = compiled_rotary(q, k, cos, sin)
        case = {"case": name, "rotary_equal_to_transformers": all(torch.equal(a, b) for a, b in zip(theirs, ours)),
                "compiled_equal_to_transformers": all(torch.equal(a, b) for a, b in zip(theirs, compiled)),
                "rotary_us": {"transformers_eager": gpu_us(lambda: apply_rotary_pos_emb(q, k, cos, sin)),
                              "compiled": gpu_us(lambda: compiled_rotary(q, k, cos, sin)),
                              "kernel": gpu_us(lambda: layer_kernels.rotary(q, k, cos, sin))}}
        ok &= case["rotary_equal_to_transformers"]
        if positions == 1:
            slots, length = rows, 512
            k_cache = torch.zeros(slots, kv_heads, length, dim, device=device, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            slot_ids = torch.randperm(slots, device=device)[:rows]
            at = torch.randint(0, length, (rows,), device=device)

            def index_put():
                k_ref[slot_ids, :, at] = k[:, :, 0]
                v_ref[slot_ids, :, at] = v[:, :, 0]

            index_put()
            layer_kernels.write_kv(k, v, k_cache, v_cache, slot_ids, at)
            case["write_equal_to_index_put"] = torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
            ok &= case["write_equal_to_index_put"]
            case["write_us"] = {"index_put_twice": gpu_us(index_put),
                                "kernel": gpu_us(lambda: layer_kernels.write_kv(k, v, k_cache, v_cache, slot_ids, at))}
        results["cases"].append(case)
        print(json.dumps(case), flush=True)
    # the fp8 activation: SiLU(gate) * up quantised per row for down, at 256 rows of each shape's width
    compiled_activation = compiled_fp8_piece(silu_mul_quantize)
    for name, width in (("llama-3.1-8b", 14336), ("smollm2-135m", 1536), ("llama-3.2-1b", 8192)):
        gate_up = (torch.randn(256, 2 * width, device=device) * 4).to(dtype)
        gate_up[3] = 0  # an all-zero row: the amax clamp
        want, want_scales = silu_mul_quantize(gate_up, width)
        got, scales = layer_kernels.silu_mul_quantize(gate_up, width, FP8, _MIN_AMAX)
        fused, fused_scales = compiled_activation(gate_up, width)
        same = lambda a, b: torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # noqa: E731 - bytes, NaNs too
        case = {"case": f"{name} fp8 activation, 256 rows", "kernel_equal_to_eager": same(got, want)
                and torch.equal(scales, want_scales),
                "kernel_values_differing": int((got.view(torch.uint8) != want.view(torch.uint8)).sum()),
                "kernel_scales_differing": int((scales != want_scales).sum()),
                "compiled_equal_to_eager": same(fused, want) and torch.equal(fused_scales, want_scales),
                "compiled_values_differing": int((fused.view(torch.uint8) != want.view(torch.uint8)).sum()),
                "activation_us": {"eager": gpu_us(lambda: silu_mul_quantize(gate_up, width)),
                                  "compiled": gpu_us(lambda: compiled_activation(gate_up, width)),
                                  "kernel": gpu_us(lambda: layer_kernels.silu_mul_quantize(gate_up, width, FP8,
                                                                                          _MIN_AMAX))}}
        ok &= case["kernel_equal_to_eager"]
        results["cases"].append(case)
        print(json.dumps(case), flush=True)
    results["all_equal"] = ok
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
