"""The 8B shape's linear layers alone, as one CUDA graph of all 32 layers, in several ways of
multiplying (docs/benchmarks.md section 18): which float8 recipe and which grouping of the products
makes the decode step's products shortest at a given batch.

Each variant runs what one decoder layer's linear work is - q/k/v, o, gate/up, the gated activation,
down - for every layer, with each layer's own weights (so the weights come from HBM as in the
engine, not from L2), captured once as a graph and replayed; GPU time per step from CUDA events.

Variants:
- bf16-separate / bf16-merged: bfloat16 products, q/k/v and gate/up as 5 products or 2 (merged
  weights, one product per group);
- fp8-row-separate: what `dtype: fp8` did in section 18's first run - row-wise scaled products per
  layer, a compiled quantiser per group input, the activation and its product op by op;
- fp8-row-merged(-fast): row-wise scaled merged products, the gated activation fused with the down
  product's input quantisation; -fast turns on use_fast_accum;
- fp8-tensor-merged(-fast): float8 products with unit per-tensor scales (the cuBLASLt path), the
  row and channel scales applied after the product by a compiled kernel (fused into the activation
  for gate/up);
- products-only rows: the same products from inputs quantised beforehand, to separate the
  quantisation's cost from the products'.

    python -m loadtest.bench_fp8_gemm --rows 256 --out reports/bench-fp8-gemm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(x):
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def silu_mul_quantize(gate_up, inter):
    g, u = gate_up[:, :inter].float(), gate_up[:, inter:].float()
    return quantize_rows((F.silu(g) * u).to(torch.bfloat16))


def scaled_silu_mul_quantize(gate_up, row_scale, col_scale, inter):
    gu = gate_up.float() * row_scale * col_scale
    return quantize_rows((F.silu(gu[:, :inter]) * gu[:, inter:]).to(torch.bfloat16))


def post_scale(out, row_scale, col_scale):
    return (out.float() * row_scale * col_scale).to(torch.bfloat16)


def quantize_weight(w):
    w32 = w.float()
    scale = w32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.t().contiguous()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="256", help="comma-separated batch sizes")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--kv", type=int, default=1024)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    H, I, KV, L = args.hidden, args.inter, args.kv, args.layers
    quantize = torch.compile(quantize_rows, dynamic=False, fullgraph=True)
    smq = torch.compile(silu_mul_quantize, dynamic=False, fullgraph=True)
    ssmq = torch.compile(scaled_silu_mul_quantize, dynamic=False, fullgraph=True)
    pscale = torch.compile(post_scale, dynamic=False, fullgraph=True)
    one = torch.ones((), device=dev)

    def bf16_weights(merged):
        def w(n, k):
            return torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        layers = []
        for _ in range(L):
            if merged:
                layers.append({"qkv": w(H + 2 * KV, H), "o": w(H, H), "gu": w(2 * I, H), "down": w(H, I)})
            else:
                layers.append({"q": w(H, H), "k": w(KV, H), "v": w(KV, H), "o": w(H, H), "g": w(I, H),
                               "u": w(I, H), "down": w(H, I)})
        return layers

    def fp8_weights(merged):
        return [{name: quantize_weight(w) for name, w in layer.items()} for layer in bf16_weights(merged)]

    def mm_row(xq, xs, w, fast=False):
        return torch._scaled_mm(xq, w[0].t(), scale_a=xs, scale_b=w[1], out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    def mm_tensor(xq, w, fast=False):
        return torch._scaled_mm(xq, w[0].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
        xi = torch.randn(rows, I, device=dev, dtype=torch.bfloat16)
        xq, xs = quantize_rows(x)
        xiq, xis = quantize_rows(xi)
        flops = 2 * rows * L * (H * (H + 2 * KV) + H * H + H * 2 * I + I * H)

        def variants():
            w = bf16_weights(False)

            def bf16_sep():
                for lw in w:
                    F.linear(x, lw["q"]); F.linear(x, lw["k"]); F.linear(x, lw["v"]); F.linear(x, lw["o"])
                    F.linear(F.silu(F.linear(x, lw["g"])) * F.linear(x, lw["u"]), lw["down"])
            yield "bf16-separate", bf16_sep
            del w
            w = bf16_weights(True)

            def bf16_merged():
                for lw in w:
                    F.linear(x, lw["qkv"]); F.linear(x, lw["o"])
                    gu = F.linear(x, lw["gu"])
                    F.linear(F.silu(gu[:, :I]) * gu[:, I:], lw["down"])
            yield "bf16-merged", bf16_merged
            del w
            w = fp8_weights(False)

            def fp8_row_sep():
                for lw in w:
                    q, s = quantize(x)
                    mm_row(q, s, lw["q"]); mm_row(q, s, lw["k"]); mm_row(q, s, lw["v"])
                    q, s = quantize(x)
                    mm_row(q, s, lw["o"])
                    q, s = quantize(x)
                    h = F.silu(mm_row(q, s, lw["g"])) * mm_row(q, s, lw["u"])
                    q, s = quantize(h)
                    mm_row(q, s, lw["down"])
            yield "fp8-row-separate", fp8_row_sep

            def fp8_row_sep_products():
                for lw in w:
                    for name in ("q", "k", "v", "o", "g", "u"):
                        mm_row(xq, xs, lw[name])
                    mm_row(xiq, xis, lw["down"])
            yield "fp8-row-separate-products", fp8_row_sep_products
            del w
            w = fp8_weights(True)
            for fast in (False, True):
                tag = "-fast" if fast else ""

                def fp8_row_merged(fast=fast):
                    for lw in w:
                        q, s = quantize(x)
                        mm_row(q, s, lw["qkv"], fast)
                        q, s = quantize(x)
                        mm_row(q, s, lw["o"], fast)
                        q, s = quantize(x)
                        q, s = smq(mm_row(q, s, lw["gu"], fast), I)
                        mm_row(q, s, lw["down"], fast)
                yield "fp8-row-merged" + tag, fp8_row_merged

                def fp8_row_merged_products(fast=fast):
                    for lw in w:
                        for name in ("qkv", "o", "gu"):
                            mm_row(xq, xs, lw[name], fast)
                        mm_row(xiq, xis, lw["down"], fast)
                yield "fp8-row-merged-products" + tag, fp8_row_merged_products

                def fp8_tensor_merged(fast=fast):
                    for lw in w:
                        q, s = quantize(x)
                        pscale(mm_tensor(q, lw["qkv"], fast), s, lw["qkv"][1])
                        q, s = quantize(x)
                        pscale(mm_tensor(q, lw["o"], fast), s, lw["o"][1])
                        q, s = quantize(x)
                        q2, s2 = ssmq(mm_tensor(q, lw["gu"], fast), s, lw["gu"][1], I)
                        pscale(mm_tensor(q2, lw["down"], fast), s2, lw["down"][1])
                yield "fp8-tensor-merged" + tag, fp8_tensor_merged

                def fp8_tensor_merged_products(fast=fast):
                    for lw in w:
                        for name in ("qkv", "o", "gu"):
                            mm_tensor(xq, lw[name], fast)
                        mm_tensor(xiq, lw["down"], fast)
                yield "fp8-tensor-merged-products" + tag, fp8_tensor_merged_products

        for name, fn in variants():
            try:
                fn(); fn()  # compile, warm
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graph.replay(); torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.replays):
                    graph.replay()
                end.record(); torch.cuda.synchronize()
                ms = start.elapsed_time(end) / args.replays
                row = {"rows": rows, "variant": name, "ms_per_step": round(ms, 3),
                       "bf16_equivalent_tflops": round(flops / ms / 1e9, 1)}
                del graph
            except Exception as exc:  # a recipe this torch or GPU lacks: say so, go on
                row = {"rows": rows, "variant": name, "error": repr(exc)[:300]}
            print(json.dumps(row), flush=True)
            results.append(row)
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": L,
              "hidden": H, "inter": I, "kv": KV, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
