"""fp8 (W8A8 float8) linear layers, backend/fp8.py: the maths on the CPU (torch._scaled_mm through
oneDNN, the call the GPU makes through cuBLASLt), shared quantisation of a group's input, and what
quantize_fp8 replaces in a real model. Greedy decoding against HF generate on the same fp8 weights
is in tests/test_precision.py; the speed on a Hopper GPU is in docs/benchmarks.md section 18."""

import pytest
import torch

from backend import fp8
from backend.fp8 import FP8, Fp8Linear, Fp8Merged, Fp8Slice, SharedInput, quantize_fp8


def _linear(inputs: int, outputs: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs, bias=False)


def test_products_are_close_to_the_float_ones_and_weights_are_a_byte_each():
    linear = _linear(256, 384)
    layer = Fp8Linear(linear)
    assert layer.weight.dtype is FP8 and layer.weight.element_size() == 1
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        ref, got = linear(x), layer(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # e4m3 keeps 3 bits of mantissa: a few percent of the product's size, not more
    relative = ((got - ref).norm() / ref.norm()).item()
    assert 0 < relative < 0.06, relative


def test_a_rows_product_does_not_depend_on_its_batch():
    """Per-token scales: a row is quantised exactly as it is beside rows of other magnitudes (a
    per-tensor scale would not: a large row elsewhere would coarsen this one), so its product
    differs only by the summation order the matrix kernel picks for the batch's size."""
    layer = Fp8Linear(_linear(128, 64))
    row = torch.randn(1, 128)
    batch = torch.cat([torch.randn(2, 128) * 100_000, row, torch.zeros(1, 128)])
    (row_q, row_scale), (batch_q, batch_scale) = fp8.quantize_rows(row), fp8.quantize_rows(batch)
    assert torch.equal(row_q[0].float(), batch_q[2].float()) and torch.equal(row_scale[0], batch_scale[2])
    with torch.no_grad():
        alone, beside = layer(row), layer(batch)
    torch.testing.assert_close(alone[0], beside[2], rtol=1e-5, atol=1e-6)
    per_tensor = (batch.abs().amax() / fp8.FP8_MAX)  # what a per-tensor scale would have done to the row
    coarse = ((row / per_tensor).to(FP8).float() * per_tensor - row).norm() / row.norm()
    fine = (row_q.float() * row_scale - row).norm() / row.norm()
    assert coarse > 2 * fine  # ... which is why the scales are per row
    assert torch.equal(beside[3], torch.zeros(64))  # a zero row: zeros, not 0/0


def test_weights_of_very_different_channels_keep_their_own_precision():
    linear = _linear(64, 32)
    with torch.no_grad():
        linear.weight[0] *= 1e-4  # a channel far smaller than the others keeps its relative precision
    layer = Fp8Linear(linear)
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref, got = linear(x)[:, 0], layer(x)[:, 0]
    assert ((got - ref).norm() / ref.norm()).item() < 0.06


def test_a_groups_input_is_quantised_once_and_then_let_go(monkeypatch):
    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x: calls.append(x.shape) or real(x))
    shared = SharedInput(3)
    q, k, v = (Fp8Linear(_linear(64, 32, seed), shared) for seed in range(3))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        outs = [layer(x) for layer in (q, k, v)]
        assert calls == [(10, 64)]  # once for the three
        assert torch.equal(outs[1], Fp8Linear(_linear(64, 32, 1))(x))  # the same as quantising alone
        assert shared._result is None and shared._input is None  # released after the third use
        q(torch.randn(2, 5, 64))
        q(x)  # a new input (or the same after release) is quantised anew
    assert calls == [(10, 64)] * 4  # the reference layer above quantised its own copy


def test_quantize_fp8_replaces_the_decoder_layers_but_not_lm_head(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    layers = model.config.num_hidden_layers
    config = model.config
    assert quantize_fp8(model) == 7 * layers  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is torch.nn.Linear
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # q/k/v and gate/up: one stacked product each, owned by the parent; the layers are its slices
    assert isinstance(attention.fp8_q_k_v, Fp8Merged) and isinstance(mlp.fp8_gate_up, Fp8Merged)
    q_width, kv_width = config.hidden_size, config.num_key_value_heads * config.head_dim
    assert [(p.start, p.stop) for p in (attention.q_proj, attention.k_proj, attention.v_proj)] == [
        (0, q_width), (q_width, q_width + kv_width), (q_width + kv_width, q_width + 2 * kv_width)]
    assert all(isinstance(p, Fp8Slice) and p.merged is attention.fp8_q_k_v
               for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    assert mlp.gate_proj.merged is mlp.up_proj.merged is mlp.fp8_gate_up
    assert type(attention.o_proj) is Fp8Linear and type(mlp.down_proj) is Fp8Linear
    # each weight counted once: the slices hold no parameters of their own
    names = [name for name, _ in model.model.layers[0].named_parameters()]
    assert "self_attn.fp8_q_k_v.weight" in names and not any("q_proj" in name for name in names)


def test_a_merged_groups_slices_are_the_separate_layers_products_computed_once():
    """Per-channel weight scales: the stacked weights are exactly the separate layers' quantised
    weights, so each slice is the product the separate layer gives; the product is made once per
    input and let go after the group's last member."""
    linears = [_linear(64, width, seed) for seed, width in enumerate((48, 16, 16))]
    merged = Fp8Merged(linears)
    parts = [Fp8Slice(merged, start, stop) for start, stop in ((0, 48), (48, 64), (64, 80))]
    products = []
    real = merged.forward
    merged.of.fn = lambda x: products.append(x.shape) or real(x)
    x = torch.randn(3, 4, 64)
    with torch.no_grad():
        got = [part(x) for part in parts]
        assert products == [(3, 4, 64)] and merged.of._result is None  # once; released after the third
        for out, linear in zip(got, linears):
            assert torch.equal(out, Fp8Linear(linear)(x))
        parts[0](x)
    assert products == [(3, 4, 64)] * 2  # after release, the same input is multiplied anew


def test_the_activation_can_be_switched_and_an_unknown_one_is_refused(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    quantize_fp8(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 4, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        before = mlp(x)
        calls = []
        assert fp8.set_activation(model, "split") == model.config.num_hidden_layers
        real = mlp.fp8_activation
        mlp.fp8_activation = lambda gate_up, width: calls.append(width) or real(gate_up, width)
        assert torch.equal(mlp(x), before) and calls == [model.config.intermediate_size]  # the forward reads it
    with pytest.raises(ValueError, match="fp8 activation 'gelu'"):
        fp8.set_activation(model, "gelu")


def test_a_gated_mlp_quantises_downs_input_inside_its_activation(tiny_model, monkeypatch):
    """The MLP's swapped forward (gate_up -> SiLU * up quantised -> down) gives exactly what
    transformers' forward over the slices gives, and down's own quantiser is not called."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    quantize_fp8(model)
    mlp = model.model.layers[1].mlp
    assert "forward" in vars(mlp)  # swapped on the instance
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = type(mlp).forward(mlp, x)  # act_fn(gate_proj(x)) * up_proj(x) -> down_proj, op by op
        monkeypatch.setattr(mlp.down_proj, "shared", lambda x: pytest.fail("down quantised its input again"))
        ours = mlp(x)
    assert ours.dtype is torch.bfloat16 and torch.equal(ours, theirs)


def test_fp8_on_a_gpu_without_float8_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    why = fp8.fp8_supported(torch.device("cuda:0"))
    assert "NVIDIA A100" in why and "8.9" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_supported(torch.device("cuda:0")) is None
    assert fp8.fp8_supported(torch.device("cpu")) is None


def test_the_worker_refuses_fp8_where_the_device_cannot(tiny_model, monkeypatch):
    from backend.engine import BootError, TransformersEngine
    from backend.protocol import WorkerSettings

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: "no float8 here")
    monkeypatch.setattr("backend.engine.fp8_supported", lambda device: "no float8 here")
    with pytest.raises(BootError, match="dtype fp8: no float8 here"):
        TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                          dtype="fp8", max_batch_size=2))


def test_an_fp8_engine_decodes_like_hf_generate_on_its_weights_with_joins_leaves_and_chunks(tiny_model, monkeypatch):
    """The engine's batching with fp8 layers: rows joining and leaving, a prompt prefilled in chunks
    between decode steps, each row's greedy output equal to HF generate's on the same fp8 model
    (per-token scales: a row's quantisation does not depend on its batch)."""
    from backend.engine import TransformersEngine
    from backend.protocol import Finished, Generate, SamplingParams, WorkerSettings
    from tests.test_engine import PROMPTS, hf_greedy, run

    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                               dtype="fp8", max_batch_size=4))
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, Fp8Linear)
    monkeypatch.setattr(engine, "prefill_budget", 5)  # the long prompt goes in over several steps
    long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=6 + 4 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS + [long_prompt])]
    got = run(engine, reqs)
    with torch.inference_mode():
        for r in reqs:
            ids, _, end = got[r.id]
            assert isinstance(end, Finished) and end.finish_reason == "length"
            assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt


def test_the_compiled_quantiser_traces_whole_and_gives_the_same_bytes():
    """What CUDA with graphs uses (fullgraph: a graph break would be an error, not a slow path),
    traced here without generating kernels; rows of any count share one compilation."""
    compiled = fp8.compiled(fp8.quantize_rows, backend="aot_eager")
    for rows in (1, 5, 64):
        x = torch.randn(rows, 96) * torch.logspace(-3, 3, rows)[:, None]
        (eager_q, eager_scale), (compiled_q, compiled_scale) = fp8.quantize_rows(x), compiled(x)
        assert compiled_q.dtype is FP8 and torch.equal(compiled_q.float(), eager_q.float())
        assert torch.equal(compiled_scale, eager_scale)
    activation = fp8.compiled(fp8.silu_mul_quantize, backend="aot_eager")
    for rows in (1, 7):
        gate_up = torch.randn(rows, 2 * 48, dtype=torch.bfloat16)
        (eager_q, eager_scale), (compiled_q, compiled_scale) = fp8.silu_mul_quantize(gate_up, 48), activation(gate_up, 48)
        assert compiled_q.shape == (rows, 48) and torch.equal(compiled_q.float(), eager_q.float())
        assert torch.equal(compiled_scale, eager_scale)
    activate = fp8.compiled(fp8.silu_mul, backend="aot_eager")  # the split activation's first half
    gate_up = torch.randn(5, 2 * 48, dtype=torch.bfloat16)
    assert torch.equal(activate(gate_up, 48), fp8.silu_mul(gate_up, 48))
    rescale = fp8.compiled(fp8.rescale_rows, backend="aot_eager")  # the tensor recipe's scaling
    product, rows_scale, columns_scale = torch.randn(6, 40) * 1e5, torch.rand(6, 1), torch.rand(1, 40)
    assert torch.equal(rescale(product, rows_scale, columns_scale, torch.bfloat16),
                       fp8.rescale_rows(product, rows_scale, columns_scale, torch.bfloat16))


def test_with_fused_pieces_the_norms_quantise_for_the_merged_products(tiny_model):
    """backend/fused.py's norm before q/k/v and before gate/up also quantises its output (one kernel
    on the GPU) and hands it to the merged product, whose own quantiser then never runs; greedy
    output with rows joining and leaving stays HF generate's (traced graphs run as they are here)."""
    from backend.engine import TransformersEngine
    from backend.fused import FusedPieces
    from backend.protocol import Generate, SamplingParams, WorkerSettings
    from tests.test_engine import PROMPTS, hf_greedy, run

    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                               dtype="fp8", max_batch_size=4))
    own_quantisations = []
    for layer in engine.model.model.layers:
        for merged in (layer.self_attn.fp8_q_k_v, layer.mlp.fp8_gate_up):
            real = merged.shared.fn
            merged.shared.fn = lambda x, real=real: own_quantisations.append(x.shape) or real(x)
    engine.fused = FusedPieces(engine.model, backend=lambda graph, inputs: graph.forward)
    layers = engine.model.config.num_hidden_layers
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=5 + 3 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    try:
        assert engine.fused.apply() == 2 * layers + 1  # the norms (fp8 MLPs keep their own forward)
        got = run(engine, reqs)
        assert own_quantisations == []
    finally:
        engine.fused.restore()
    with torch.inference_mode():
        for r in reqs:
            assert got[r.id][0] == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
    assert own_quantisations  # unfused (HF generate above), the products quantise for themselves


@pytest.mark.parametrize("recipe", ["row-fast", "tensor"])
def test_every_recipe_multiplies_like_the_row_wise_one(recipe):
    """The recipes differ in the kernel and where the scales are applied, not in the maths: the
    products agree with the row-wise one to the compute dtype's rounding; an unknown one is refused."""
    linear = _linear(256, 96).to(torch.bfloat16)
    row, other = Fp8Linear(linear), Fp8Linear(linear)
    assert row.recipe == fp8.DEFAULT_RECIPE == "row-fast"
    row.set_recipe("row")
    other.set_recipe(recipe)
    x = torch.randn(5, 256, dtype=torch.bfloat16) * torch.logspace(-2, 2, 5, dtype=torch.bfloat16)[:, None]
    with torch.no_grad():
        expected, got = row(x), other(x)
    assert got.dtype is torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=1e-6)
    with pytest.raises(ValueError, match="fp8 recipe 'blockwise'"):
        other.set_recipe("blockwise")


def test_an_engine_with_the_tensor_recipe_decodes_like_hf_generate(tiny_model):
    from backend.engine import TransformersEngine
    from backend.protocol import Generate, SamplingParams, WorkerSettings
    from tests.test_engine import PROMPTS, hf_greedy, run

    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                               dtype="fp8", max_batch_size=4))
    assert fp8.set_recipe(engine.model, "tensor") == 4 * engine.model.config.num_hidden_layers  # 2 merged + o + down
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    got = run(engine, reqs)
    with torch.inference_mode():
        for r in reqs:
            assert got[r.id][0] == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
