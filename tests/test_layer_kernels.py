"""The decode step's rotary, KV-cache-write and fp8 activation kernels (backend/layer_kernels.py), run on the CPU
under Triton's interpreter: against the torch code they replace, bit for bit, and inside the engine
against HF generate.

On a GPU they run compiled inside the captured decode graphs; CI has no GPU, so the interpreter
(TRITON_INTERPRET=1, read when the module is imported: hence a subprocess) checks the same code.
The interpreter rounds float32 to bfloat16 its own way (not to nearest even as the GPU and torch
do), so the rotary is compared in float32 here - which checks the order of its operations and that
no multiply-add is fused - and in bfloat16 by the GPU benchmark (loadtest/gpu_kernels_check.py)."""

import pytest

from conftest import run_under_triton_interpreter

pytest.importorskip("torch")
pytest.importorskip("triton")

KERNELS_AGAINST_TORCH = r"""
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from backend import layer_kernels
torch.manual_seed(0)
checked = 0
# (heads, kv_heads, dim, rows, positions): a decode step's single position and a prompt's several;
# head counts that are not powers of two
for heads, kv_heads, dim, rows, positions in ((9, 3, 64, 5, 1), (4, 1, 16, 3, 7), (32, 8, 128, 2, 1)):
    # q and k as the model makes them from a stacked q/k/v product: column views, transposed
    stacked = torch.randn(rows, positions, (heads + 2 * kv_heads) * dim)
    q = stacked[..., :heads * dim].view(rows, positions, heads, dim).transpose(1, 2)
    k = stacked[..., heads * dim:(heads + kv_heads) * dim].view(rows, positions, kv_heads, dim).transpose(1, 2)
    angles = torch.randn(rows, positions, dim // 2) * 30
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    assert layer_kernels.usable(q) and layer_kernels.rotary_fits(q, k, cos, sin, 1)
    theirs, ours = apply_rotary_pos_emb(q, k, cos, sin), layer_kernels.rotary(q, k, cos, sin)
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b), (heads, dim, (a - b).abs().max())
        checked += 1
    assert not layer_kernels.rotary_fits(q, k, cos, sin, 2)  # another layout: the torch code
    assert not layer_kernels.rotary_fits(q[..., :dim - 2], k[..., :dim - 2], cos[..., :dim - 2],
                                         sin[..., :dim - 2], 1)  # not a power of two
# the cache write: slots and positions in any order, a slot's other positions untouched
for dtype in (torch.float32, torch.bfloat16):
    slots, kv_heads, positions, dim = 6, 3, 10, 16
    k_cache = torch.randn(slots, kv_heads, positions, dim).to(dtype)
    v_cache = torch.randn(slots, kv_heads, positions, dim).to(dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    stacked = torch.randn(4, 1, 3 * kv_heads * dim).to(dtype)
    key = stacked[..., :kv_heads * dim].view(4, 1, kv_heads, dim).transpose(1, 2)
    value = stacked[..., kv_heads * dim:2 * kv_heads * dim].view(4, 1, kv_heads, dim).transpose(1, 2)
    rows, at = torch.tensor([5, 0, 2, 3]), torch.tensor([0, 9, 4, 4])
    k_expected[rows, :, at] = key[:, :, 0]
    v_expected[rows, :, at] = value[:, :, 0]
    assert layer_kernels.write_kv_fits(key, value, k_cache, v_cache)
    layer_kernels.write_kv(key, value, k_cache, v_cache, rows, at)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected), dtype
    checked += 1
    assert not layer_kernels.write_kv_fits(key, value, k_cache.float() if dtype != torch.float32 else k_cache.double(),
                                           v_cache)  # mixed dtypes: the torch code
# the fp8 activation: SiLU(gate) * up quantised per row, against backend/fp8.py's torch code. The
# interpreter's exp, division and float8 rounding are numpy's, not CUDA's, so here: the scales
# within a few float32 steps, each value within one float8 step, an all-zero row's clamp.
from backend.fp8 import FP8, _MIN_AMAX, silu_mul_quantize
for rows, width in ((5, 48), (3, 1536)):
    gate_up = (torch.randn(rows, 2 * width) * 3).to(torch.float16)
    gate_up[1] = 0
    assert layer_kernels.silu_mul_quantize_fits(gate_up, width)
    assert not layer_kernels.silu_mul_quantize_fits(gate_up.float(), width)
    assert not layer_kernels.silu_mul_quantize_fits(gate_up, width + 1)
    expected, expected_scales = silu_mul_quantize(gate_up, width)
    got, scales = layer_kernels.silu_mul_quantize(gate_up, width, FP8, _MIN_AMAX)
    assert got.dtype == FP8 and got.shape == (rows, width) and scales.shape == (rows, 1)
    assert torch.allclose(scales, expected_scales, rtol=1e-6, atol=0), (scales, expected_scales)
    want, have = expected.float(), got.float()
    step = want.abs() / 8 + 2 ** -9  # e4m3: 3 mantissa bits
    # the interpreter's float8 rounding drops the carry when a value rounds up to a power of two
    # (2^k comes out as 2^(k-1)): those, and only those, are let through
    carry_lost = (have == want / 2) & (torch.log2(want.abs()) == torch.log2(want.abs()).round())
    assert (((have - want).abs() <= step) | carry_lost).all()
    assert got[1].float().abs().max() == 0 and scales[1, 0] == expected_scales[1, 0]
    checked += 1
print("checked", checked)
"""

ENGINE_AGAINST_HF = r"""
import sys
import torch
sys.path.insert(0, "tests")
from test_engine import PROMPTS, hf_greedy, run
import backend.layer_kernels as kernels
from backend.engine import TransformersEngine
from backend.fused import FusedPieces
from backend.protocol import Finished, Generate, SamplingParams, WorkerSettings
engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=sys.argv[1],
                                           max_batch_size=4))
calls = {"rotary": 0, "write_kv": 0}
def counted(name):
    original = getattr(kernels, name)
    def call(*args):
        calls[name] += 1
        return original(*args)
    setattr(kernels, name, call)
counted("rotary"); counted("write_kv")
# the fused pieces, traced but run as they are (no code generated on the CPU): the rotary piece
# dispatches to the kernel, which the interpreter makes usable here
fused = FusedPieces(engine.model, backend="eager")
fused.apply()
assert fused.rotary_swapped
# rows join and leave the running batch, a sampled row beside the greedy ones
reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(PROMPTS)]
reqs.append(Generate(id=99, prompt="A late arrival", params=SamplingParams(max_tokens=9, temperature=0.0,
                                                                           ignore_eos=True)))
got = run(engine, reqs)
assert calls["rotary"] and calls["write_kv"], calls
fused.restore()
for r in reqs:
    ids, _, end = got[r.id]
    assert isinstance(end, Finished), end
    assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
print("kernel calls", calls)
"""


def test_the_kernels_compute_exactly_what_the_torch_code_does():
    assert "checked 10" in run_under_triton_interpreter(KERNELS_AGAINST_TORCH)


def test_the_engine_with_the_kernels_still_matches_hf_generate_with_joins_and_leaves(tiny_model):
    out = run_under_triton_interpreter(ENGINE_AGAINST_HF, str(tiny_model))
    assert "kernel calls" in out
