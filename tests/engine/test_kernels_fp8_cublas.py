"""Block-FP8 activation quantisation (Triton, interpreted on CPU) and the cuBLAS FP8 path's pure parts.

The quantiser is checked against the format's torch reference in every layout the cuBLAS path uses (scales
outer-dim-major, rows padded to a multiple of 4, SwiGLU fused in). cuBLAS itself only runs on a GPU
(tests/gpu/test_fp8_cublas_gpu.py); here the per-expert orchestration of `fp8_cublas.experts` runs with the
GEMM replaced by the dequantised float32 product, against the formula.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU (CI): run the kernels in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moefleet.engine.kernels import fp8_cublas, fp8_quant  # noqa: E402
from moefleet.engine.kernels.fp8_blocks import (  # noqa: E402
    SCALE_EPS,
    dequantize_block,
    quantize_per_token_group_reference,
    quantize_weight_block,
)
from moefleet.engine.layers.experts import CUBLAS_MIN_FLOPS_PER_EXPERT, Experts  # noqa: E402

if not fp8_quant._INTERPRET:
    pytest.skip(
        "compiled Triton here: tests/gpu/test_fp8_cublas_gpu.py covers the kernels", allow_module_level=True
    )


def _x(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)


@pytest.mark.parametrize("cols,group", [(40, 16), (320, 16), (300, 128), (16 * 9, 16)])
def test_quantize_matches_reference_in_both_scale_layouts(cols, group):
    """Several groups per program (up to 8), a ragged last group, more groups than one program holds."""
    x = _x(6, cols, seed=cols)
    x[2] = 0  # an all-zero row: scale eps, values 0
    q_ref, s_ref = quantize_per_token_group_reference(x, group)
    for column_major in (False, True):
        q, s = fp8_quant.quantize_per_token_group(x, group, column_major_scales=column_major)
        assert s.shape == s_ref.shape and q.shape == x.shape
        if column_major:
            assert s.stride() == (1, 6)  # outer-dim-major: what cuBLAS's BlockWise1x128 reads
        torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
        torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=0)


def test_quantize_pads_rows_with_zeros():
    x = _x(5, 64, seed=3)
    q, s = fp8_quant.quantize_per_token_group(x, 16, column_major_scales=True, pad_rows_to=4)
    assert q.shape == (8, 64) and s.shape == (8, 4) and s.stride() == (1, 8)
    q_ref, s_ref = quantize_per_token_group_reference(x, 16)
    torch.testing.assert_close(q[:5].float(), q_ref.float(), atol=0, rtol=0)
    torch.testing.assert_close(s[:5], s_ref, atol=0, rtol=0)
    assert q[5:].float().abs().max() == 0
    torch.testing.assert_close(s[5:], torch.full((3, 4), SCALE_EPS / fp8_quant.FP8_MAX))


def test_quantize_with_fused_swiglu_matches_unfused():
    gate_up = _x(7, 2 * 48, seed=5)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up  # bf16, as the unfused path hands it to the next GEMM
    q_ref, s_ref = quantize_per_token_group_reference(act, 16)
    q, s = fp8_quant.quantize_per_token_group(gate_up, 16, swiglu=True)
    assert q.shape == (7, 48)
    # the kernel's silu and bf16 roundings vs torch's (the interpreter's casts): within 2 bf16 steps
    torch.testing.assert_close(s, s_ref, rtol=2e-2, atol=0)
    restored = q.float() * s.repeat_interleave(16, 1)
    torch.testing.assert_close(restored, act.float(), rtol=0.07, atol=1e-3)
    with pytest.raises(ValueError, match="even width"):
        fp8_quant.quantize_per_token_group(gate_up[:, :95], 16, swiglu=True)


def test_shape_and_device_rules():
    assert fp8_cublas.shape_ok(1536, 7168, (128, 128))
    assert fp8_cublas.shape_ok(576, 7168, (128, 128))  # kv_a_proj: ragged last N tile
    assert not fp8_cublas.shape_ok(1536, 7000, (128, 128))  # K must be whole tiles
    assert not fp8_cublas.shape_ok(512, 256, (128, 128))  # ... in groups of 4 scale columns
    assert fp8_cublas.shape_ok(7168, 2048, (128, 128)) and fp8_cublas.shape_ok(32768, 512, (128, 128))
    assert not fp8_cublas.shape_ok(1536, 7168, (64, 64))  # only DeepSeek's 128x128 blocks
    assert not fp8_cublas.shape_ok(1540, 7168, (128, 128))  # output rows not 16-byte aligned
    assert not fp8_cublas.device_ok(torch.device("cpu"))


def _dequantised_gemm(xq, xs, weight, scale_inv, rows, dtype):
    """Stand-in for cuBLAS: the exact product of the dequantised operands (block 16 here)."""
    group = xq.shape[1] // xs.shape[1]
    a = xq.float() * xs.repeat_interleave(group, 1)
    w = dequantize_block(weight, scale_inv, (group, group))
    return (a @ w.t()).to(dtype)[:rows]


def test_experts_orchestration_matches_formula(monkeypatch):
    """Per-expert slices, an expert with no rows, padding rows, rows padded to 4 inside: against the formula
    (per-token-group quantised activations, block weights, SwiGLU in bf16)."""
    block, num_experts, hidden, inter = (16, 16), 3, 32, 32
    monkeypatch.setattr(fp8_cublas, "BLOCK", block)
    monkeypatch.setattr(fp8_cublas, "gemm", _dequantised_gemm)
    gen = torch.Generator().manual_seed(7)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.2
    q13, s13 = quantize_weight_block(w13, block)
    q2, s2 = quantize_weight_block(w2, block)
    counts = [5, 0, 6]
    x = _x(sum(counts) + 2, hidden, seed=9)  # two padding rows at the end
    out = fp8_cublas.experts(x, counts, q13, q2, s13, s2)
    assert out.shape == x.shape and out[11:].abs().max() == 0
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = x[start : start + n]
        qa, sa = quantize_per_token_group_reference(rows, 16)
        a = qa.float() * sa.repeat_interleave(16, 1)
        gate, up = (a @ dequantize_block(q13[e], s13[e], block).t()).to(torch.bfloat16).chunk(2, -1)
        act = F.silu(gate) * up
        qb, sb = quantize_per_token_group_reference(act, 16)
        b = qb.float() * sb.repeat_interleave(16, 1)
        expected = (b @ dequantize_block(q2[e], s2[e], block).t()).to(torch.bfloat16)
        # test_kernels_moe's FP8 criterion: the two bf16 SwiGLU intermediates may differ by one bf16 ulp,
        # which can move a requantised e4m3 value by one step; 5e-2 of the output's max magnitude
        diff = (out[start : start + n].float() - expected.float()).abs().max()
        assert diff <= 5e-2 * expected.float().abs().max(), (e, diff)
        start += n


def test_host_count_path_needs_fp8_enough_rows_and_a_verified_device(monkeypatch):
    experts = Experts([0, 1], hidden_size=512, intermediate_size=512)
    cuda = torch.device("cuda", 0)
    enough = 2 * int(CUBLAS_MIN_FLOPS_PER_EXPERT / (6 * 512 * 512) + 1)  # 2 experts' worth of rows
    deepseek = Experts([0, 1, 2, 3, 4, 5, 6, 7, 8], hidden_size=7168, intermediate_size=2048)
    deepseek.to_fp8((128, 128))
    monkeypatch.setattr(fp8_cublas, "device_ok", lambda device: device.type == "cuda")
    assert not experts.host_count_path(cuda, enough)  # bf16 experts: the fused kernel
    experts.to_fp8((128, 128))
    assert experts.host_count_path(cuda, enough)
    assert not experts.host_count_path(cuda, enough - 2)  # less work per expert: the fused kernel
    # DeepSeek-V3 width, EP32's 9 experts: the measured crossover (~2,100 rows per expert)
    assert not deepseek.host_count_path(cuda, 9 * 1024)  # 2k-token chunk: Triton measured 2x faster
    assert deepseek.host_count_path(cuda, 9 * 4096)  # cuBLAS measured 1.75x faster
    assert deepseek.host_count_path(cuda, 131_072)  # the 16k-token EP32 prefill step
    assert not experts.host_count_path(torch.device("cpu"), enough)
    experts.library_gemms = False  # what `set_gemm_backend(model, "triton")` sets
    assert not experts.host_count_path(cuda, enough)
    small_blocks = Experts([0], hidden_size=512, intermediate_size=512)
    small_blocks.to_fp8((64, 64))
    monkeypatch.setattr(fp8_cublas, "device_ok", lambda device: True)
    assert not small_blocks.host_count_path(cuda, enough)


def test_set_gemm_backend_flips_every_layer_with_a_choice():
    from moefleet.engine.gemm_backend import set_gemm_backend
    from moefleet.engine.layers.linear import Fp8Linear, Linear

    model = torch.nn.Sequential(
        Fp8Linear(512, 512, (128, 128)),
        Linear(512, 512),
        Experts([0, 1], hidden_size=512, intermediate_size=512),
    )
    assert set_gemm_backend(model, "triton") == 2  # the plain Linear has no choice
    assert model[0].library_gemms is False and model[2].library_gemms is False
    assert model[0].splitk_gemms is False
    assert set_gemm_backend(model, "cublas") == 2
    assert model[0].library_gemms is True and model[2].library_gemms is True
    assert model[0].splitk_gemms is False
    assert set_gemm_backend(model, "auto") == 2
    assert model[0].library_gemms is True and model[0].splitk_gemms is True
    with pytest.raises(ValueError, match="gemm backend 'cutlass' must be one of"):
        set_gemm_backend(model, "cutlass")
