"""Fewer kernels per decode step: RMSNorm, the gated MLP's activation and the rotary embedding of
the model's layers, each compiled by torch.compile into one or two fused kernels (the rotary
embedding, on CUDA, a Triton kernel of backend/layer_kernels.py).

Why: on the H200 the 135M shape's captured decode step at batch 256 took ~4.1 ms of GPU time for
a few hundred microseconds of memory traffic. transformers' layers are written op by op - RMSNorm
alone is six kernels (cast, square, mean, rsqrt, two multiplies), the rotary embedding ten - so a
layer is ~38 small kernels, and at a few microseconds each the step is bound by their count, not
by the GPU's bandwidth. Inductor fuses each of those pieces into one kernel. The model classes stay
transformers' own: only the forwards of the matching modules (and the rotary function the
attention module calls) are swapped, per instance, and can be put back (`restore`).

Each piece is one compiled function, dynamic in the rows and static in the model's widths
(backend/compiling.py says why), its weights passed as arguments, so one compilation serves every
layer, batch size and prompt length (compiling a module method instead would specialise on each
module instance). Only the pieces whose maths is exactly the one written
here are swapped: RMSNorm without offset, an MLP with SiLU gating and no biases, the rotate-half
rotary embedding - each is checked on a probe input against the code it would replace before it
is swapped (same output, bit for bit, uncompiled). The engine uses this on CUDA with
captured graphs; on the CPU a test runs the same plumbing with a backend that runs the traced
graphs as they are.

For an fp8 model (backend/fp8.py) a norm whose output only a merged float8 product reads (the one
before q/k/v, the one before gate/up) also quantises that output in its kernel and hands it to the
product (`fp8_feeds`), which saves the quantiser's kernel twice per layer.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from backend import layer_kernels
from backend.compiling import compile_rows
from backend.fp8 import quantize_rows


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """RMSNorm whose output is also quantised per row for the float8 product it feeds (backend/fp8.py):
    (the normed x, its rows as float8, their scales) from one kernel instead of the norm's and the
    quantiser's."""
    normed = _rms_norm(x, weight, eps)
    return (normed, *quantize_rows(normed.reshape(-1, normed.shape[-1])))


def _gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotary_by_kernel_where_it_fits(compiled_rotary):
    """The rotary piece: a Triton kernel where it can run (CUDA; backend/layer_kernels.py says why
    it is faster than the compiled one for q and k that are views of a stacked product), the
    compiled function elsewhere. The choice is made per call, in Python, so inside a captured
    graph it is made once, at capture."""
    def rotary(q, k, cos, sin, unsqueeze_dim=1):
        if layer_kernels.rotary_fits(q, k, cos, sin, unsqueeze_dim):
            return layer_kernels.rotary(q, k, cos, sin)
        return compiled_rotary(q, k, cos, sin, unsqueeze_dim)
    return rotary


def _probe(like: torch.Tensor, *shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Random inputs of these shapes on the model's device and dtype (the same ones every time)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(torch.randn(shape, generator=generator).to(like.device, like.dtype) for shape in shapes)


def _same_output(original, ours, args: tuple) -> bool:
    """Whether the model's code computes exactly what the piece that would replace it computes (run
    uncompiled, on a probe input): a module or function whose name matches but whose maths differs
    (an offset on the norm's weight, another activation, an interleaved rotary) keeps its own."""
    with torch.no_grad():
        try:
            theirs, mine = original(*args), ours(*args)
            if isinstance(theirs, torch.Tensor):
                return torch.equal(theirs, mine)
            return all(torch.equal(a, b) for a, b in zip(theirs, mine, strict=True))
        except Exception:  # noqa: BLE001 - a signature or shape we do not know: not ours to swap
            return False


def _is_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _is_gated_mlp(module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(p, torch.nn.Linear) and p.bias is None for p in parts)


class FusedPieces:
    """Swaps the model's RMSNorm, MLP and rotary forwards for compiled ones; `restore` undoes it."""

    def __init__(self, model: torch.nn.Module, backend="inductor") -> None:
        self.model = model
        self.backend = backend
        self._compiled = None  # (norm, mlp, rotary), made on first apply: compiling happens on first call
        self._swapped: list[torch.nn.Module] = []
        self._rotary_home = None  # the modeling module whose apply_rotary_pos_emb was swapped
        self._rotary_original = None
        self.active = False

    def apply(self) -> int:
        """Swap what matches; returns how many modules were swapped."""
        if self.active:
            return len(self._swapped)
        if self._compiled is None:
            # Each piece is compiled a few times (one row or many, one position or many; per width;
            # backend/compiling.py), dynamic in the rows only.
            # emulate_precision_casts: round to the model's dtype wherever transformers' op-by-op
            # code does (inductor would otherwise keep fp32 between fused ops), so that greedy
            # output stays transformers' own.
            options = {"emulate_precision_casts": True} if self.backend == "inductor" else None
            self._compiled = tuple(compile_rows(fn, row_args, backend=self.backend, options=options)
                                   for fn, row_args in ((_rms_norm, (0,)), (_gated_mlp, (0,)),
                                                        (_rotary, (0, 1, 2, 3)), (_rms_norm_quantize, (0,))))
        norm, mlp, compiled_rotary, norm_quantize = self._compiled
        rotary = _rotary_by_kernel_where_it_fits(compiled_rotary)
        for module in self.model.modules():
            # (what replaces the forward, the module's tensors it takes, the plain function it must
            # equal on a probe, the probe's width)
            if _is_rms_norm(module):
                args = lambda m: (m.weight, m.variance_epsilon)
                plain, width = _rms_norm, module.weight.shape[-1]
                feeds = getattr(module, "fp8_feeds", None)
                # an fp8 model's norm before q/k/v or gate/up (backend/fp8.py): normed and quantised in one
                piece = norm if feeds is None else self._norm_priming(norm_quantize, feeds)
            elif _is_gated_mlp(module):
                piece, args = mlp, lambda m: (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
                plain, width = _gated_mlp, module.gate_proj.in_features
            else:
                continue
            if _same_output(module.forward, lambda x, m=module: plain(x, *args(m)),
                            _probe(next(module.parameters()), (2, 3, width))):
                module.forward = lambda x, m=module, piece=piece, args=args: piece(x, *args(m))
                self._swapped.append(module)
        home = sys.modules.get(type(self.model).__module__)
        original = getattr(home, "apply_rotary_pos_emb", None)
        like = next(self.model.parameters())
        if callable(original) and _same_output(original, _rotary, _probe(like, (1, 2, 3, 8), (1, 2, 3, 8),
                                                                          (1, 3, 8), (1, 3, 8))):
            self._rotary_home, self._rotary_original = home, original
            home.apply_rotary_pos_emb = rotary
        self.active = True
        return len(self._swapped)

    @staticmethod
    def _norm_priming(norm_quantize, feeds):
        def piece(x, weight, eps):
            normed, quantised, scales = norm_quantize(x, weight, eps)
            feeds.prime(normed, (quantised, scales))  # the product's own quantiser finds it done
            return normed
        return piece

    @contextlib.contextmanager
    def paused(self):
        """transformers' own forwards inside the block (a reference run), the pieces again after."""
        active = self.active
        self.restore()
        try:
            yield
        finally:
            if active:
                self.apply()

    def restore(self) -> None:
        for module in self._swapped:
            del module.forward  # the class's own forward again
        self._swapped.clear()
        if self._rotary_home is not None:
            self._rotary_home.apply_rotary_pos_emb = self._rotary_original
            self._rotary_home = self._rotary_original = None
        self.active = False

    @property
    def rotary_swapped(self) -> bool:
        return self._rotary_home is not None
