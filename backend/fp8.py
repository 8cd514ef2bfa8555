"""float8 (e4m3) weights and activations for the decoder's linear layers (`dtype: fp8`).

Why: on the H100/H200 the 8B shape's decode step at batch 256 is two thirds matrix products, and
they already run at ~530 TFLOP/s in bfloat16 (docs/benchmarks.md section 17): the step cannot get
much shorter in 16 bits. Hopper's tensor cores multiply float8 at twice the bfloat16 rate and the
weights are half the bytes, so the products are where fp8 pays - W8A8, not weight-only (int8
weight-only, section 7, saves memory and loses speed: it multiplies in 16 bits after dequantising).

The maths, per linear layer y = x Wᵀ:
- each output channel's weights are scaled by their largest magnitude into e4m3's range (448) once,
  at load; the scales are kept in float32;
- each row of x (one token) is scaled the same way at every call (dynamic, per token), so a row's
  result does not depend on what else is in the batch;
- `torch._scaled_mm` multiplies the float8 operands, accumulates in float32 and applies both scales
  (row-wise scaling: Hopper's cuBLASLt on CUDA, oneDNN on the CPU - the same call, so CI runs the
  path the GPU takes).

Layers that read the same input (q/k/v read the same hidden state, the MLP's gate and up the same
input) are one product: their float8 weights are stacked into one matrix (`Fp8Merged`, owned by the
parent module as `fp8_q_k_v` / `fp8_gate_up`; per-channel scales make the stacked weights exactly the
separate ones), multiplied once per input, and each layer is a column slice of that product
(`Fp8Slice`). At batch 256 of the 8B shape the k and v products alone are 16 output tiles each for
132 SMs; stacked, q/k/v fill the GPU better and the step launches 3 products fewer per layer. The
product is kept until every member has read its slice, then let go. A gated SiLU MLP over stacked
gate/up then runs as gate_up -> SiLU * up, quantised for down in the same function -> down (compiled
into one kernel on CUDA with graphs: op by op it is four). lm_head and the embeddings
stay in the compute dtype (the logits are where precision shows first; small models tie lm_head
to the embeddings).

backend/fused.py's MLP piece swaps only MLPs made of nn.Linear; an fp8 model's gated MLPs get the
forward above instead, and its norms before q/k/v and gate/up quantise their output for the
product in the same compiled kernel (fused.py, `fp8_feeds`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend import layer_kernels
from backend.compiling import compile_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A row or channel of zeros gets this scale, not zero (a zero scale would make 0/0).
_MIN_AMAX = 1e-12


def fp8_supported(device: torch.device) -> str | None:
    """None if this device multiplies float8, else why not (for the worker's boot error)."""
    if device.type == "cpu":
        return None  # oneDNN's _scaled_mm: slow, but the same maths (tests, development)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return None
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no float8 "
                "tensor cores; fp8 needs 8.9 or later (Ada, Hopper)")
    return f"fp8 is not supported on {device.type}"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as float8 scaled per row, the per-row scales as an [rows, 1] float32 column)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# How an Fp8Linear multiplies (set_recipe; docs/benchmarks.md section 18 measures them):
# row: torch._scaled_mm with the row and channel scales, accumulating in float32;
# row-fast: the same with use_fast_accum (Hopper's faster, less precise accumulation);
# tensor: unit per-tensor scales (cuBLASLt), a float32 product, both scales applied after it.
RECIPES = ("row", "row-fast", "tensor")
# row-fast: on the H100 its products took 0.3 ms less per 8B step than row's with greedy output
# still HF generate's (docs/benchmarks.md section 18, third pass); fast accumulation is also what
# torchao's float8 inference and vLLM's Hopper float8 kernels use.
DEFAULT_RECIPE = "row-fast"


def rescale_rows(product: torch.Tensor, row_scale: torch.Tensor, column_scale: torch.Tensor, dtype: torch.dtype):
    """A float32 product of unit-scaled float8 operands times its rows' and columns' scales, in dtype."""
    return (product * row_scale * column_scale).to(dtype)


def silu_mul(gate_up: torch.Tensor, width: int) -> torch.Tensor:
    """A gated SiLU MLP's activation over stacked gate/up rows ([rows, 2 * width]: gate first), in
    the compute dtype as transformers' `act_fn(gate) * up` rounds it."""
    return F.silu(gate_up[:, :width]) * gate_up[:, width:]


def silu_mul_quantize(gate_up: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_mul quantised per row for down, as one function (compiled: one fused computation)."""
    return quantize_rows(silu_mul(gate_up, width))


# How a gated MLP's activation reaches down's input (set_activation; the same bytes either way):
# fused: silu_mul_quantize compiled as one function; on the H100, compiled with every size dynamic,
#   inductor made two kernels of it that took 31 us per 8B layer, ~3x their memory traffic
#   (docs/benchmarks.md section 18, second pass; static widths since: backend/compiling.py);
# split: silu_mul and quantize_rows compiled apart (the activation written once in the compute
#   dtype, then the quantiser that o_proj's input uses), to measure against it.
# kernel: backend/layer_kernels.py's Triton kernel, one pass over each row (where it runs: CUDA),
#   the compiled fused function elsewhere.
ACTIVATIONS = ("fused", "split", "kernel")


class OncePerInput:
    """Computes fn(x) once for a group of members that read the same x: the first member to see an
    input computes it, the others reuse the result, and after the last member's use it is dropped
    (an eager prefill of thousands of tokens must not keep a copy per layer alive)."""

    __slots__ = ("members", "fn", "_input", "_result", "_uses")

    def __init__(self, members: int, fn) -> None:
        self.members = members
        self.fn = fn
        self._input: torch.Tensor | None = None
        self._result = None
        self._uses = 0

    def prime(self, x: torch.Tensor, result) -> None:
        """Hand over fn(x) made elsewhere (a norm that quantises its own output in the same kernel)."""
        self._input, self._result, self._uses = x, result, 0

    def __call__(self, x: torch.Tensor):
        if x is not self._input or self._result is None:
            self._input, self._uses = x, 0
            self._result = self.fn(x)
        result = self._result
        self._uses += 1
        if self._uses >= self.members:
            self._input = self._result = None
        return result


class SharedInput(OncePerInput):
    """x's rows (all but the last dimension flattened) as float8 and their scales, once per input
    for a group of `members` readers. quantize: None for quantize_rows as written (eager), else a
    compiled one."""

    __slots__ = ("quantize",)

    def __init__(self, members: int, quantize=None) -> None:
        super().__init__(members, self._quantize)
        self.quantize = quantize

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(-1, x.shape[-1])
        return quantize_rows(rows) if self.quantize is None else self.quantize(rows)


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weights are float8 with one scale per output channel and whose input is
    quantised per row at each call (see the module's docstring)."""

    def __init__(self, linear: torch.nn.Linear, shared: SharedInput | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # per-channel scales: a stacked weight quantises alike
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX  # [out, 1]
        quantised = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # _scaled_mm wants its second operand column-major: the [out, in] rows transposed are.
        self.weight = torch.nn.Parameter(quantised, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, out]
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.compute_dtype = linear.weight.dtype
        self.shared = shared or SharedInput(1)
        self.recipe, self.rescale, self.unit_scale = DEFAULT_RECIPE, rescale_rows, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multiply(*self.shared(x)).reshape(*x.shape[:-1], self.out_features)

    def multiply(self, quantised: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The product of rows already quantised (float8 [rows, in], scales [rows, 1])."""
        if self.recipe == "tensor":
            # the float8 product with unit scales, accumulated and returned in float32, then both
            # scales applied by one compiled kernel (rescale). Kept as a measured alternative: on
            # the H100 (torch 2.11) its products took 0.33 ms less per 8B step than row's, and
            # its rescaling 0.75 ms more (docs/benchmarks.md section 18).
            unit = self.unit_scale
            out = torch._scaled_mm(quantised, self.weight.t(), scale_a=unit, scale_b=unit, out_dtype=torch.float32)
            out = self.rescale(out, scale, self.weight_scale, self.compute_dtype)
        else:
            out = torch._scaled_mm(quantised, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                                   out_dtype=self.compute_dtype, use_fast_accum=self.recipe == "row-fast")
        return out if self.bias is None else out + self.bias

    def set_recipe(self, recipe: str, rescale=None) -> None:
        """How the product is computed (RECIPES); rescale: the tensor recipe's scaling function
        (rescale_rows as written, or a compiled one)."""
        if recipe not in RECIPES:
            raise ValueError(f"fp8 recipe {recipe!r}: one of {', '.join(RECIPES)}")
        self.recipe, self.rescale = recipe, rescale or rescale_rows
        if recipe == "tensor" and self.unit_scale is None:
            self.unit_scale = torch.ones((), dtype=torch.float32, device=self.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3 W8A8"


def _stacked(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer whose output is the given layers' outputs side by side (weights are moved
    into it, not copied twice: the caller drops the originals)."""
    first = linears[0]
    stacked = torch.nn.Linear(first.in_features, sum(lin.out_features for lin in linears),
                              bias=first.bias is not None, device="meta")
    stacked.weight = torch.nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    if first.bias is not None:
        stacked.bias = torch.nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return stacked


class Fp8Merged(Fp8Linear):
    """The stacked product of a group of layers reading one input (see the module's docstring):
    `of(x)` is the product for x, computed once for the group's members."""

    def __init__(self, linears: list[torch.nn.Linear], quantize=None) -> None:
        super().__init__(_stacked(linears), SharedInput(1, quantize))
        self.widths = [lin.out_features for lin in linears]
        self.of = OncePerInput(len(linears), self.forward)


class Fp8Slice(torch.nn.Module):
    """One layer of a merged group: its columns of the group's product (a view, no copy)."""

    def __init__(self, merged: Fp8Merged, start: int, stop: int) -> None:
        super().__init__()
        # Not registered as a submodule: the parent owns the merged product; each slice only reads it.
        self.__dict__["merged"] = merged
        self.start, self.stop = start, stop
        self.in_features, self.out_features = merged.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged.of(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a merged float8 product"


# Layers that read the same input, by their names in transformers' decoder layers, and the name
# their parent gives the merged product.
_GROUPS = ((("q_proj", "k_proj", "v_proj"), "fp8_q_k_v"), (("gate_proj", "up_proj"), "fp8_gate_up"))
# In a decoder layer, the norm whose output is a merged product's input: (norm, product's parent, product).
_NORM_FEEDS = (("input_layernorm", "self_attn", "fp8_q_k_v"), ("post_attention_layernorm", "mlp", "fp8_gate_up"))


_compiled: dict[tuple[str, str], object] = {}


# The arguments of each compiled function that carry rows (backend/compiling.py); others: (0,).
_ROW_ARGS = {"rescale_rows": (0, 1)}


def compiled(fn, backend: str = "inductor"):
    """fn (quantize_rows, silu_mul_quantize, silu_mul or rescale_rows) compiled by inductor into one
    or two kernels, once per process, dynamic in the rows and static in the widths (compile_rows).
    Written op by op the quantiser is eight kernels per input - ~1,000 per decode step of the 8B
    shape, which at a microsecond or two each inside a CUDA graph would eat much of what fp8 saves.
    emulate_precision_casts: round to the compute dtype where the eager code does, so the compiled
    activation rounds as transformers' does. `backend` lets a CPU test trace the same functions
    whole without generating kernels."""
    key = (fn.__name__, backend)
    if key not in _compiled:
        options = {"emulate_precision_casts": True} if backend == "inductor" else None
        _compiled[key] = compile_rows(fn, _ROW_ARGS.get(fn.__name__, (0,)), backend=backend, options=options)
    return _compiled[key]


def _activation(kind: str, compile_it: bool):
    """The gated activation with down's quantisation (ACTIVATIONS), eager or compiled."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"fp8 activation {kind!r}: one of {', '.join(ACTIVATIONS)}")
    if not compile_it:
        return silu_mul_quantize
    if kind == "fused":
        return compiled(silu_mul_quantize)
    if kind == "kernel":
        return _kernel_where_it_runs(compiled(silu_mul_quantize))
    activate, quantize = compiled(silu_mul), compiled(quantize_rows)
    return lambda gate_up, width: quantize(activate(gate_up, width))


def _kernel_where_it_runs(fallback):
    def activation(gate_up: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_kernels.silu_mul_quantize_fits(gate_up, width):
            return layer_kernels.silu_mul_quantize(gate_up, width, FP8, _MIN_AMAX)
        return fallback(gate_up, width)
    return activation


def set_activation(model: torch.nn.Module, kind: str, compile_it: bool = False) -> int:
    """Every swapped gated MLP of the model computes its activation the `kind` way (ACTIVATIONS);
    returns how many. Before any CUDA graph is captured, as set_recipe."""
    activation = _activation(kind, compile_it)
    mlps = [m for m in model.modules() if "fp8_activation" in vars(m)]
    for mlp in mlps:
        mlp.fp8_activation = activation
    return len(mlps)


def _fuse_gated_mlp(mlp: torch.nn.Module, activation) -> bool:
    """Swap a gated SiLU MLP whose gate/up are one merged product for gate_up -> activation quantised
    for down -> down, if on a probe input it gives exactly what the MLP's own forward gives. The
    activation used is the MLP's `fp8_activation` attribute (set_activation changes it)."""
    merged, down = getattr(mlp, "fp8_gate_up", None), getattr(mlp, "down_proj", None)
    if not (isinstance(merged, Fp8Merged) and isinstance(down, Fp8Linear)):
        return False  # the activation is checked by the probe below (transformers has its own SiLU classes)
    width = merged.widths[0]

    def gated(x: torch.Tensor, activation) -> torch.Tensor:
        gate_up = merged(x).reshape(-1, 2 * width)
        return down.multiply(*activation(gate_up, width)).reshape(*x.shape[:-1], down.out_features)

    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn((2, 3, merged.in_features), generator=generator).to(merged.weight.device, merged.compute_dtype)
    with torch.no_grad():
        try:  # eager on both sides: the compiled activation is the same function, traced
            same = torch.equal(mlp.forward(probe), gated(probe, silu_mul_quantize))
        except Exception:  # noqa: BLE001 - an MLP of another shape or signature: not ours to swap
            same = False
    if same:
        mlp.fp8_activation = activation
        mlp.forward = lambda x: gated(x, mlp.fp8_activation)
    return same


def set_recipe(model: torch.nn.Module, recipe: str, compile_rescale: bool = False) -> int:
    """Every Fp8Linear of the model multiplies by `recipe` (RECIPES); returns how many. Before any
    CUDA graph is captured: a captured step keeps the recipe it was captured with."""
    rescale = compiled(rescale_rows) if compile_rescale else None
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.set_recipe(recipe, rescale)
    return len(layers)


def quantize_fp8(model: torch.nn.Module, compile_quantize: bool = False) -> int:
    """Replace the decoder's linear layers (not lm_head) by float8 ones - each group of layers that
    reads one input by one merged product and its slices - and fuse gated MLPs' activations with
    down's quantisation; returns how many layers were replaced. compile_quantize: quantise and
    activate with the compiled functions (CUDA with graphs)."""
    quantize = compiled(quantize_rows) if compile_quantize else None
    activation = _activation("fused", compile_quantize)
    replaced = 0
    mlps = []
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        grouped = set()
        for group, merged_name in _GROUPS:
            members = [name for name in group if isinstance(children.get(name), torch.nn.Linear)]
            if len(members) < 2 or len({children[name].bias is None for name in members}) > 1:
                continue
            merged = Fp8Merged([children[name] for name in members], quantize)
            parent.add_module(merged_name, merged)
            start = 0
            for name, width in zip(members, merged.widths):
                setattr(parent, name, Fp8Slice(merged, start, start + width))
                start += width
                replaced += 1
            grouped.update(members)
            if merged_name == "fp8_gate_up" and members == ["gate_proj", "up_proj"]:
                mlps.append(parent)
        for name, child in children.items():
            if name in grouped or name == "lm_head" or type(child) is not torch.nn.Linear:
                continue
            setattr(parent, name, Fp8Linear(child, SharedInput(1, quantize)))
            replaced += 1
    for mlp in mlps:
        _fuse_gated_mlp(mlp, activation)
    # Tell each norm whose output only a merged product reads where its quantised copy goes:
    # backend/fused.py's compiled norm then quantises in the same kernel and primes it (`fp8_feeds`).
    for layer in model.modules():
        for norm_name, parent_name, merged_name in _NORM_FEEDS:
            norm = getattr(layer, norm_name, None)
            merged = getattr(getattr(layer, parent_name, None), merged_name, None)
            if isinstance(norm, torch.nn.Module) and isinstance(merged, Fp8Merged):
                norm.fp8_feeds = merged.shared
    return replaced
