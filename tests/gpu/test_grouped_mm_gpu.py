"""bf16 experts on torch's grouped GEMM (`kernels.grouped_mm`) against the fused Triton kernel, on a GPU.

Both compute in bf16 with float32 accumulation; they differ in summation order and in where the SwiGLU
intermediate is rounded, so outputs agree within bf16 rounding of the output scale (rel L2 <= 1e-2). Padding
rows (past the counts' sum) are undefined in both and not compared. Also: a CUDA graph captured once replays
new counts correctly (the offsets live on the device), and `Experts.forward` takes the path for bf16
prefill-sized rows only."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels import grouped_mm
from moefleet.engine.kernels.fused_moe import fused_experts_grouped

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
DEV = torch.device("cuda", 0)


def _weights(experts, hidden, inter, dtype=torch.bfloat16):
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEV) * 0.03).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=DEV) * 0.03).to(dtype)
    return w13, w2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _needs_grouped_mm(w13, x):
    if not grouped_mm.usable(w13, x):
        pytest.skip(
            f"torch grouped GEMM not verified on {torch.cuda.get_device_name(0)} / torch {torch.__version__}"
        )


@pytest.mark.parametrize("counts", [[512, 512, 512, 512], [0, 1000, 3, 0], [7, 0, 0, 1]])
def test_grouped_mm_matches_fused_triton(counts):
    w13, w2 = _weights(4, 1024, 512)
    valid = sum(counts)
    x = torch.randn(valid + 9, 1024, device=DEV, dtype=torch.bfloat16)  # 9 padding rows
    _needs_grouped_mm(w13, x)
    c = torch.tensor(counts, dtype=torch.int32, device=DEV)
    got = grouped_mm.experts(x, c, w13, w2)
    ref = fused_experts_grouped(x, c, w13, w2)
    assert got.shape == x.shape
    assert _rel(got[:valid], ref[:valid]) <= 1e-2


def test_grouped_mm_replays_in_a_cuda_graph_with_new_counts():
    w13, w2 = _weights(4, 512, 256)
    x = torch.randn(2048, 512, device=DEV, dtype=torch.bfloat16)
    _needs_grouped_mm(w13, x)
    counts = torch.tensor([512, 512, 512, 512], dtype=torch.int32, device=DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        grouped_mm.experts(x, counts, w13, w2)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_mm.experts(x, counts, w13, w2)
    counts.copy_(torch.tensor([2000, 0, 40, 8], dtype=torch.int32))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, grouped_mm.experts(x, counts, w13, w2), atol=0, rtol=0)


def test_experts_layer_takes_grouped_mm_for_bf16_only(monkeypatch):
    from moefleet.engine.layers.experts import Experts

    calls = []
    original = grouped_mm.experts
    monkeypatch.setattr(grouped_mm, "experts", lambda *a: calls.append(1) or original(*a))
    for dtype, expected in ((torch.bfloat16, [1]), (torch.float32, [])):
        calls.clear()
        layer = Experts([0, 1], 512, 256).to(DEV, dtype)
        with torch.no_grad():
            layer.w13.normal_(0, 0.03)
            layer.w2.normal_(0, 0.03)
        x = torch.randn(2 * 1024 + 64, 512, device=DEV, dtype=dtype)
        out = layer(x, counts=torch.tensor([1030, 1034], dtype=torch.int32, device=DEV))
        assert calls == expected and out.shape == x.shape and torch.isfinite(out[:2064]).all()
        calls.clear()
        layer(x[:64], counts=torch.tensor([30, 34], dtype=torch.int32, device=DEV))  # decode-sized
        assert calls == []
