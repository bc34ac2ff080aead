"""cuBLAS blockwise FP8 GEMMs (`kernels.fp8_cublas`) on an NVIDIA GPU against the format's reference.

Reference: the activations quantised per token per 128 columns (the torch reference quantiser) and the weights
dequantised from their 128x128 tiles, multiplied in float32; cuBLAS gets the same quantised operands, so the
only differences are its accumulation order and the bf16 output (rel L2 <= 1e-2; measured ~2e-5 vs the Triton
kernel in benchmarks/fp8_experts_probe.py). The experts path is compared with the Triton fused FP8 kernel at
3e-2 (both requantise a bf16 SwiGLU intermediate; measured 1.6e-2), and a whole MoE layer's prefill-mode
forward (dispatcher, host counts, per-expert cuBLAS) with its decode-mode forward (fused top-k kernel).
"""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels import fp8_cublas, fp8_quant
from moefleet.engine.kernels.fp8_blocks import (
    dequantize_block,
    quantize_per_token_group_reference,
    quantize_weight_block,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
BLOCK = (128, 128)
DEV = torch.device("cuda", 0)


def _needs_cublas_fp8():
    if not fp8_cublas.device_ok(DEV):
        pytest.skip(
            f"cuBLAS blockwise FP8 not verified on {torch.cuda.get_device_name(0)} / torch {torch.__version__}"
        )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_on_gpu_matches_reference():
    x = torch.randn(37, 7168, device=DEV, dtype=torch.bfloat16) * 3
    q_ref, s_ref = quantize_per_token_group_reference(x, 128)
    q, s = fp8_quant.quantize_per_token_group(x, 128, column_major_scales=True, pad_rows_to=4)
    assert q.shape == (40, 7168) and s.stride() == (1, 40)
    torch.testing.assert_close(s[:37], s_ref, atol=0, rtol=0)
    torch.testing.assert_close(q[:37].float(), q_ref.float(), atol=0, rtol=0)
    assert q[37:].float().abs().max() == 0
    gate_up = torch.randn(37, 4096, device=DEV, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, -1)
    qa, sa = fp8_quant.quantize_per_token_group(gate_up, 128, swiglu=True)
    _, sa_ref = quantize_per_token_group_reference(torch.nn.functional.silu(gate) * up, 128)
    torch.testing.assert_close(sa, sa_ref, rtol=1e-2, atol=0)


@pytest.mark.parametrize("rows", [1, 7, 100, 256, 4097])
@pytest.mark.parametrize("n,k", [(1536, 7168), (576, 7168), (7168, 2048)])
def test_linear_matches_dequantised_reference(rows, n, k):
    _needs_cublas_fp8()
    x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
    q, s = quantize_weight_block(torch.randn(n, k, device=DEV) * 0.02, BLOCK)
    got = fp8_cublas.linear(x, q, s)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    xq, xs = quantize_per_token_group_reference(x, 128)
    ref = (xq.float() * xs.repeat_interleave(128, 1)) @ dequantize_block(q, s, BLOCK).t()
    assert _rel(got, ref) <= 1e-2


def test_fp8_linear_layer_takes_cublas():
    _needs_cublas_fp8()
    from moefleet.engine.gemm_backend import set_gemm_backend
    from moefleet.engine.kernels.fused_moe import w8a8_block_linear
    from moefleet.engine.layers.linear import Fp8Linear

    layer = Fp8Linear(7168, 1536, BLOCK).to(DEV)
    q, s = quantize_weight_block(torch.randn(1536, 7168, device=DEV) * 0.02, BLOCK)
    layer.weight.data.copy_(q)
    layer.weight_scale_inv.data.copy_(s)
    x = torch.randn(3, 5, 7168, device=DEV, dtype=torch.bfloat16)
    # `auto` sends 15 rows of this shape to the split-K kernel (fp8_splitk_configs.json: faster at M <= 16)
    set_gemm_backend(layer, "cublas")
    got = layer(x)
    assert got.shape == (3, 5, 1536)
    torch.testing.assert_close(got.view(15, -1), fp8_cublas.linear(x.view(15, -1), q, s), atol=0, rtol=0)
    assert _rel(got.view(15, -1), w8a8_block_linear(x.view(15, -1), q, s, BLOCK)) <= 1e-2
    set_gemm_backend(layer, "auto")
    assert _rel(layer(x), got) <= 1e-2


def test_experts_match_triton_fused_fp8():
    _needs_cublas_fp8()
    from moefleet.engine.kernels.fused_moe import fused_experts_grouped

    experts, hidden, inter = 4, 1024, 512
    q13, s13 = quantize_weight_block(torch.randn(experts, 2 * inter, hidden, device=DEV) * 0.03, BLOCK)
    q2, s2 = quantize_weight_block(torch.randn(experts, hidden, inter, device=DEV) * 0.03, BLOCK)
    counts = [300, 0, 1, 1234]  # an empty expert, a single row, odd sizes
    x = torch.randn(sum(counts) + 5, hidden, device=DEV, dtype=torch.bfloat16)  # 5 padding rows
    got = fp8_cublas.experts(x, counts, q13, q2, s13, s2)
    ref = fused_experts_grouped(
        x,
        torch.tensor(counts, dtype=torch.int32, device=DEV),
        q13,
        q2,
        w13_scale=s13,
        w2_scale=s2,
        block_shape=BLOCK,
    )
    valid = sum(counts)
    assert got[valid:].abs().max() == 0
    assert _rel(got[:valid], ref[:valid]) <= 3e-2


def test_moe_prefill_mode_takes_per_expert_cublas_and_matches_decode_mode(monkeypatch):
    _needs_cublas_fp8()
    from moefleet.engine.fp8_weights import quantize_model
    from moefleet.engine.layers import experts as experts_module
    from moefleet.engine.layers.moe import MoE
    from moefleet.engine.layers.router import RoutingConfig

    torch.manual_seed(0)
    hidden, inter, experts, top_k = 512, 512, 4, 2
    moe = MoE(hidden, inter, RoutingConfig(num_experts=experts, top_k=top_k)).to(DEV, torch.bfloat16)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.05)
        moe.experts.w13.normal_(0, 0.03)
        moe.experts.w2.normal_(0, 0.03)
    quantize_model(moe, BLOCK)  # the experts to block FP8 (what `moefleet bench --quantization fp8` does)
    assert moe.experts.w13.dtype == torch.float8_e4m3fn
    # the threshold scaled to this small width: the path is chosen from 1,024 rows per expert here
    monkeypatch.setattr(experts_module, "CUBLAS_MIN_FLOPS_PER_EXPERT", 1024 * 6 * hidden * inter)
    tokens = 1024 * experts // top_k + 17
    x = torch.randn(tokens, hidden, device=DEV, dtype=torch.bfloat16)
    assert not moe.local_topk_path(x, moe.dispatcher, is_prefill=True)
    assert moe.local_topk_path(x, moe.dispatcher, is_prefill=False)
    assert moe.local_topk_path(x[:8], moe.dispatcher, is_prefill=True)  # too few rows: fused kernel
    from moefleet.engine.layers.token_dispatch import HostCounts

    waits = []  # the counts come from the dispatcher's copy (HostCounts), not a new sync on the experts' stream
    original_wait = HostCounts.wait
    monkeypatch.setattr(HostCounts, "wait", lambda self: waits.append(1) or original_wait(self))
    calls = []
    original = fp8_cublas.experts
    fp8_cublas.experts = lambda *a, **kw: calls.append(1) or original(*a, **kw)  # type: ignore[assignment]
    try:
        with torch.inference_mode():
            prefill = moe(x, is_prefill=True)
            decode = moe(x, is_prefill=False)
    finally:
        fp8_cublas.experts = original  # type: ignore[assignment]
    assert calls == [1]
    assert waits == [1]
    assert _rel(prefill, decode) <= 3e-2
