"""The live-prefix decode attention kernels (backend/decode_attention.py), run on the CPU under
Triton's interpreter: against SDPA directly, and inside the engine against HF generate.

On a GPU they run compiled inside the captured decode graphs; CI has no GPU, so the interpreter
(TRITON_INTERPRET=1, read when the kernels are defined: hence a subprocess) checks the same code.
The interpreter's bfloat16 matrix products are wrong (it multiplies the raw bits), so these run
in float32; the benchmark checks bfloat16 on the GPU (greedy_vs_hf in loadtest.bench_gpu)."""

import pytest

from conftest import run_under_triton_interpreter

pytest.importorskip("torch")
pytest.importorskip("triton")

KERNEL_AGAINST_SDPA = r"""
import torch, torch.nn.functional as F
from backend.decode_attention import choose_splits, decode_attention
torch.manual_seed(0)
checked = 0
for heads, kv_heads, dim in ((9, 3, 64), (4, 1, 16), (8, 8, 32)):
    for splits in (1, 2, 4):
        rows, slots, positions = 5, 7, 300
        # the model's query layout: [rows, heads, 1, dim] as a transposed view
        q = torch.randn(rows, 1, heads, dim).transpose(1, 2)
        k = torch.randn(slots, kv_heads, positions, dim)
        v = torch.randn(slots, kv_heads, positions, dim)
        lengths = torch.tensor([1, 64, 65, 200, 300])  # one position, block edges, a whole slot
        out = decode_attention(q, k, v, lengths, dim ** -0.5, splits)
        assert out.shape == (rows, 1, heads, dim)
        for r in range(rows):
            n = int(lengths[r])
            ref = F.scaled_dot_product_attention(q[r:r + 1], k[r:r + 1, :, :n], v[r:r + 1, :, :n], enable_gqa=True)
            err = (out[r:r + 1].transpose(1, 2) - ref).abs().max().item()
            assert err < 1e-4, (heads, kv_heads, dim, splits, r, err)
            checked += 1
# splits: enough programs for the GPU, never below a few blocks per split
assert choose_splits(256, 3, 256, 528) == 1
assert choose_splits(1, 8, 4096, 528) == 16
assert choose_splits(1, 8, 64, 528) == 1
print("checked", checked)
"""

ENGINE_AGAINST_HF = r"""
import sys
import torch
sys.path.insert(0, "tests")
from test_engine import PROMPTS, hf_greedy, run
from backend.engine import TransformersEngine
from backend.protocol import Finished, Generate, SamplingParams, WorkerSettings
engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=sys.argv[1],
                                           max_batch_size=4))
assert not engine.live_prefix_attention  # CPU: SDPA unless asked
engine.live_prefix_attention = True
calls = []
import backend.decode_attention as kernels
original = kernels.decode_attention
def counting(*args):
    calls.append(args[-1])
    return original(*args)
kernels.decode_attention = counting
# rows join and leave the running batch, steps pipelined, a sampled row beside the greedy ones
reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(PROMPTS)]
reqs.append(Generate(id=99, prompt="A late arrival", params=SamplingParams(max_tokens=9, temperature=0.0,
                                                                           ignore_eos=True)))
reqs.append(Generate(id=7, prompt=PROMPTS[2], params=SamplingParams(max_tokens=8, temperature=0.8, seed=5)))
got = run(engine, reqs)
assert calls, "the kernel never ran"
engine.live_prefix_attention = False
for r in reqs:
    ids, _, end = got[r.id]
    assert isinstance(end, Finished), end
    if r.params.temperature == 0:
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
again = run(engine, [Generate(id=7, prompt=PROMPTS[2], params=SamplingParams(max_tokens=8, temperature=0.8, seed=5))])
assert again[7][0] == got[7][0]  # the same seeded sample through SDPA
print("kernel calls", len(calls))
"""


def test_the_kernel_matches_sdpa_over_each_rows_live_prefix_with_and_without_splits():
    assert "checked 45" in run_under_triton_interpreter(KERNEL_AGAINST_SDPA)


def test_the_engine_with_the_kernel_still_matches_hf_generate_with_joins_and_leaves(tiny_model):
    out = run_under_triton_interpreter(ENGINE_AGAINST_HF, str(tiny_model))
    assert "kernel calls" in out
