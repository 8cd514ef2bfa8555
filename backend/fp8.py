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

Inputs shared by several layers (q/k/v read the same hidden state, the MLP's gate and up the same
input) are quantised once per call: the layers of a group share a quantiser that keeps the last
input's float8 copy until every member has used it, then lets it go. lm_head and the embeddings
stay in the compute dtype (the logits are where precision shows first; small models tie lm_head
to the embeddings).

Not used by hand-written fused pieces: backend/fused.py swaps only MLPs made of nn.Linear, so an
fp8 model's MLPs keep their own forward (the norms and rotary stay fused).
"""

from __future__ import annotations

import torch

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


class SharedInput:
    """Quantises the input of a group of layers once: the first member to see an input quantises it,
    the others reuse the result, and after the last member's use the copy is dropped (an eager
    prefill of thousands of tokens must not keep a float8 copy per layer alive)."""

    __slots__ = ("members", "quantize", "_input", "_quantised", "_uses")

    def __init__(self, members: int, quantize=None) -> None:
        self.members = members
        self.quantize = quantize  # None: quantize_rows as written (eager); else a compiled one
        self._input: torch.Tensor | None = None
        self._quantised: tuple[torch.Tensor, torch.Tensor] | None = None
        self._uses = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x's rows (all but the last dimension flattened) as float8, and their scales."""
        if x is not self._input or self._quantised is None:
            rows = x.reshape(-1, x.shape[-1])
            self._input, self._uses = x, 0
            self._quantised = quantize_rows(rows) if self.quantize is None else self.quantize(rows)
        quantised = self._quantised
        self._uses += 1
        if self._uses >= self.members:
            self._input = self._quantised = None
        return quantised


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weights are float8 with one scale per output channel and whose input is
    quantised per row at each call (see the module's docstring)."""

    def __init__(self, linear: torch.nn.Linear, shared: SharedInput | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX  # [out, 1]
        quantised = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # _scaled_mm wants its second operand column-major: the [out, in] rows transposed are.
        self.weight = torch.nn.Parameter(quantised, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, out]
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.compute_dtype = linear.weight.dtype
        self.shared = shared or SharedInput(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantised, scale = self.shared(x)
        out = torch._scaled_mm(quantised, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3 W8A8"


# Layers that read the same input, by their names in transformers' decoder layers.
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


_compiled_quantize = None


def compiled_quantize_rows(backend: str = "inductor"):
    """quantize_rows compiled by inductor into one or two kernels (made once per process). Written
    op by op it is eight kernels per group's input - ~1,000 per decode step of the 8B shape, which
    at a microsecond or two each inside a CUDA graph would eat much of what fp8 saves. `backend`
    lets a CPU test trace the same function whole without generating kernels."""
    global _compiled_quantize
    if _compiled_quantize is None or _compiled_quantize[0] != backend:
        _compiled_quantize = (backend, torch.compile(quantize_rows, dynamic=True, fullgraph=True, backend=backend))
    return _compiled_quantize[1]


def quantize_fp8(model: torch.nn.Module, compile_quantize: bool = False) -> int:
    """Replace the decoder's linear layers (not lm_head) by Fp8Linear; returns how many.
    compile_quantize: quantise inputs with compiled_quantize_rows() (CUDA with graphs)."""
    quantize = compiled_quantize_rows() if compile_quantize else None
    replaced = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        grouped = set()
        for group in _GROUPS:
            members = [name for name in group if isinstance(children.get(name), torch.nn.Linear)]
            if len(members) > 1:
                shared = SharedInput(len(members), quantize)
                for name in members:
                    setattr(parent, name, Fp8Linear(children[name], shared))
                    replaced += 1
                grouped.update(members)
        for name, child in children.items():
            if name in grouped or name == "lm_head" or type(child) is not torch.nn.Linear:
                continue
            setattr(parent, name, Fp8Linear(child, SharedInput(1, quantize)))
            replaced += 1
    return replaced
