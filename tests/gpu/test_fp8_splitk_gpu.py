"""The decode-size split-K block-FP8 GEMM (`kernels.fp8_splitk`) compiled on an NVIDIA GPU.

Against the format's reference (quantised activations x dequantised weights in float32, rel L2 <= 1e-2) and
against cuBLAS's blockwise GEMM at DeepSeek-V3's decode shapes; captured in a CUDA graph and replayed on new
inputs; and `Fp8Linear` routing a measured shape to it (the table entry) and everything else to cuBLAS.
"""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels import fp8_cublas, fp8_splitk, fp8_splitk_configs
from moefleet.engine.kernels.fp8_blocks import (
    dequantize_block,
    quantize_per_token_group_reference,
    quantize_weight_block,
)
from moefleet.engine.kernels.fp8_splitk_configs import SplitKConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
DEV = torch.device("cuda", 0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weight(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, device=DEV, generator=torch.Generator(DEV).manual_seed(seed)) * 0.05
    return quantize_weight_block(w, (128, 128))


def _reference(x, wq, ws):
    xq, xs = quantize_per_token_group_reference(x, 128)
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]
    return xd @ dequantize_block(wq, ws, (128, 128)).T


@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (256, 1536, 7168, SplitKConfig(64, 128, 6)),  # q_a
        (128, 576, 7168, SplitKConfig(32, 64, 8, num_stages=3)),  # kv_a, N ragged against 128
        (100, 24576, 1536, SplitKConfig(64, 128, 1)),  # q_b, no split
        (7, 7168, 16384, SplitKConfig(16, 128, 4, num_warps=4)),  # o_proj, a few rows
        (256, 4096, 7168, SplitKConfig(128, 128, 2, num_warps=8)),  # shared w13
        (16, 1536, 7168, SplitKConfig(16, 64, 8, swap_ab=True)),  # swapped: W rows on the MMA's wide side
        (100, 7168, 2048, SplitKConfig(32, 128, 2, swap_ab=True)),  # swapped, rows over 4 tiles
    ],
)
def test_splitk_matches_reference_and_cublas(m, n, k, config):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    wq, ws = _weight(n, k, seed=m + n)
    out = fp8_splitk.linear(x, wq, ws, config)
    assert _rel(out, _reference(x, wq, ws)) < 1e-2
    if fp8_cublas.device_ok(DEV) and fp8_cublas.shape_ok(n, k, (128, 128)):
        assert _rel(out, fp8_cublas.linear(x, wq, ws)) < 1e-2


def test_splitk_replays_from_a_cuda_graph_on_new_inputs():
    wq, ws = _weight(1536, 7168, seed=1)
    x = torch.zeros(64, 7168, device=DEV, dtype=torch.bfloat16)
    config = SplitKConfig(64, 128, 6)
    fp8_splitk.linear(x, wq, ws, config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_splitk.linear(x, wq, ws, config)
    for seed in range(3):
        x.copy_(torch.randn(64, 7168, device=DEV, generator=torch.Generator(DEV).manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, _reference(x, wq, ws)) < 1e-2


def test_fp8_linear_routes_measured_shapes_to_splitk(monkeypatch):
    """A table entry that beats cuBLAS routes those rows to split-K; other rows and `cublas` keep cuBLAS."""
    from moefleet.engine.gemm_backend import set_gemm_backend
    from moefleet.engine.layers.linear import Fp8Linear

    calls: list[SplitKConfig] = []
    real = fp8_splitk.linear

    def recording(x, w, s, config, out_dtype=None):
        calls.append(config)
        return real(x, w, s, config, out_dtype)

    monkeypatch.setattr(fp8_splitk, "linear", recording)
    table = {
        (1536, 7168): [
            (64, {"config": {"block_m": 64, "block_n": 128, "split": 6}, "us": 5, "cublas_us": 20})
        ]
    }
    monkeypatch.setattr(fp8_splitk_configs, "_table", lambda *a: table)
    layer = Fp8Linear(7168, 1536, (128, 128)).to(DEV)
    wq, ws = _weight(1536, 7168, seed=2)
    layer.weight.data.copy_(wq)
    layer.weight_scale_inv.data.copy_(ws)
    x = torch.randn(48, 7168, device=DEV, dtype=torch.bfloat16)
    out = layer(x)
    assert calls == [SplitKConfig(64, 128, 6)]
    assert _rel(out, _reference(x, wq, ws)) < 1e-2
    layer(torch.randn(65, 7168, device=DEV, dtype=torch.bfloat16))  # above the measured rows: cuBLAS
    set_gemm_backend(layer, "cublas")
    layer(x)
    assert len(calls) == 1
