"""backend/compiling.py: the fused pieces are compiled dynamic in the rows and static in the widths
(on the GPU that lets inductor's kernels load whole 16-byte vectors; here the traced graphs are
read, not run as kernels)."""

from __future__ import annotations

import torch

from backend import compiling, fp8


def _recording_backend(graphs: list):
    """A torch.compile backend that keeps, per compilation, the symbolic or constant sizes of the
    traced graph's tensor inputs, and runs the graph as it is."""
    def backend(graph_module, example_inputs):
        sizes = []
        for node in graph_module.graph.nodes:
            value = node.meta.get("example_value")
            if node.op == "placeholder" and isinstance(value, torch.Tensor):
                sizes.append(tuple(d if isinstance(d, int) else "dynamic" for d in value.shape))
        graphs.append(sizes)
        return graph_module.forward
    return backend


def test_rows_are_dynamic_and_widths_are_constants_of_the_compilation():
    graphs: list = []
    activation = compiling.compile_rows(fp8.silu_mul_quantize, backend=_recording_backend(graphs))
    for rows in (2, 5, 64, 7):
        gate_up = torch.randn(rows, 2 * 48, dtype=torch.bfloat16)
        quantised, scales = activation(gate_up, 48)
        expected, expected_scales = fp8.silu_mul_quantize(gate_up, 48)
        assert torch.equal(quantised.float(), expected.float()) and torch.equal(scales, expected_scales)
    assert graphs == [[("dynamic", 96)]]  # one compilation for every row count; the width a constant
    activation(torch.randn(3, 2 * 32, dtype=torch.bfloat16), 32)  # another width: compiled for it
    assert graphs[1] == [("dynamic", 64)]
    activation(torch.randn(1, 2 * 32, dtype=torch.bfloat16), 32)  # one row: torch specialises size 1
    assert graphs[2] == [(1, 64)]
    assert len(graphs) == 3


def test_only_the_row_arguments_are_dynamic():
    """The tensor recipe's rescale takes two tensors of rows and one of columns; a 3-D input (a
    norm's [batch, positions, width]) is dynamic in all but its last dimension."""
    graphs: list = []
    rescale = compiling.compile_rows(fp8.rescale_rows, (0, 1), backend=_recording_backend(graphs))
    for rows in (3, 6):
        rescale(torch.randn(rows, 40), torch.rand(rows, 1), torch.rand(1, 40), torch.bfloat16)
    assert graphs == [[("dynamic", 40), ("dynamic", 1), (1, 40)]]

    def scaled(x, weight):
        return x * weight

    graphs.clear()
    norm_like = compiling.compile_rows(scaled, backend=_recording_backend(graphs))
    for batch, positions in ((2, 3), (4, 9)):
        norm_like(torch.randn(batch, positions, 16), torch.randn(16))
    assert graphs == [[("dynamic", "dynamic", 16), (16,)]]


def test_every_size_dynamic_when_asked(monkeypatch):
    """bench_gpu --dynamic-widths: the way before, to measure against."""
    monkeypatch.setattr(compiling, "all_sizes_dynamic", True)
    graphs: list = []
    quantise = compiling.compile_rows(fp8.quantize_rows, backend=_recording_backend(graphs))
    quantise(torch.randn(5, 24))
    assert len(graphs) == 1 and graphs[0][0] == ("dynamic", "dynamic")
