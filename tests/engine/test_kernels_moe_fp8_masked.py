"""The masked fused MoE kernel on FP8 rows with per-row-per-group scales (DeepEP low-latency's layout) and the
masked-only FP8 (de)quantisation kernels, on CPU (TRITON_INTERPRET=1) against torch references written from
the formula: value = fp8 * scale per row per group, then the SwiGLU expert in float64.

Every case poisons the rows at or past masked_m[e] (and their scales) with NaN: a kernel that read them would
put NaN into the rows it is checked on. Scales are laid out like DeepEP's (column-major in the last two dims).
Tolerances: float32 weights 1e-4 (K tiles summed in another order); FP8 weights: the w8a8 reference quantises
the bf16 intermediate exactly as the format says, at 5e-2 of the output's max magnitude (see
test_kernels_moe.py for why one bf16 ulp can move an e4m3 step).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU (CI): run the kernels in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moefleet.engine.kernels import fp8_masked, fp8_quant, fused_moe  # noqa: E402
from moefleet.engine.kernels.fused_moe_configs import MoEConfig  # noqa: E402

if not fused_moe._INTERPRET:
    pytest.skip(
        "Triton kernels are compiled here (a GPU machine): tests/gpu/test_moe_kernels_gpu.py covers them",
        allow_module_level=True,
    )

CFG = MoEConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)
BLOCK = (16, 16)
FP8 = torch.float8_e4m3fn
MASKS = [[0, 19, 5, 1], [19, 19, 19, 19], [0, 0, 0, 0], [17, 0, 3, 16]]


def deepep_like_rows(
    num_experts: int, capacity: int, hidden: int, group: int, masked_m: list[int], seed: int
):
    """fp8 rows [E, C, D] + float32 scales [E, C, D/group] stored column-major in (C, D/group) as DeepEP
    allocates them; rows at or past masked_m[e] hold NaN (fp8 and scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_experts * capacity, hidden, generator=g) * 3
    q, s = fp8_quant.quantize_per_token_group_reference(x, group)
    q, s = q.view(num_experts, capacity, hidden), s.view(num_experts, capacity, -1)
    scales = torch.empty(num_experts, hidden // group, capacity).transpose(1, 2)  # DeepEP's strides
    scales.copy_(s)
    for e, m in enumerate(masked_m):
        q[e, m:] = float("nan")
        scales[e, m:] = float("nan")
    return q, scales


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    group = q.shape[-1] // s.shape[-1]
    return q.float() * s.float().repeat_interleave(group, -1)


def swiglu64(x, w13, w2):
    inter = w13.shape[0] // 2
    x = x.double()
    return ((F.silu(x @ w13[:inter].double().T) * (x @ w13[inter:].double().T)) @ w2.double().T).float()


def weights(num_experts: int, hidden: int, inter: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return w13, w2


# ---- masked-only (de)quantisation ----


@pytest.mark.parametrize("masked_m", MASKS)
def test_dequantize_masked_matches_formula(masked_m):
    q, s = deepep_like_rows(4, 19, 48, 16, masked_m, seed=1)
    m = torch.tensor(masked_m)
    out = fp8_masked.dequantize_masked(q, s, m, torch.float32)
    assert out.shape == q.shape and out.dtype == torch.float32
    for e, rows in enumerate(masked_m):
        want = q[e, :rows].float() * s[e, :rows].repeat_interleave(16, 1)
        torch.testing.assert_close(out[e, :rows], want, atol=0, rtol=0)
        ref = fp8_masked.dequantize_masked_reference(q, s, m, torch.float32)[e]
        torch.testing.assert_close(out[e, :rows], ref, atol=0, rtol=0)


def test_dequantize_masked_rejects_mismatched_scales():
    q, s = deepep_like_rows(2, 4, 32, 16, [1, 1], seed=2)
    with pytest.raises(ValueError, match="one per row per group"):
        fp8_masked.dequantize_masked(q, s[:, :3], torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="masked layout"):
        fp8_masked.dequantize_masked(q[0], s[0], torch.tensor([1]))


@pytest.mark.parametrize("masked_m", [[0, 19, 5], [3, 0, 19]])
def test_quantize_masked_matches_per_token_group_reference(masked_m):
    x = torch.randn(3, 19, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 2
    for e, m in enumerate(masked_m):
        x[e, m:] = float("nan")
    q, s = fp8_masked.quantize_masked(x, torch.tensor(masked_m), 16)
    assert q.dtype == FP8 and s.shape == (3, 19, 3)
    for e, m in enumerate(masked_m):
        q_ref, s_ref = fp8_quant.quantize_per_token_group_reference(x[e, :m], 16)
        torch.testing.assert_close(s[e, :m], s_ref, atol=0, rtol=0)
        torch.testing.assert_close(q[e, :m].float(), q_ref.float(), atol=0, rtol=0)


# ---- the masked fused MoE kernel on fp8 rows ----


@pytest.mark.parametrize("masked_m", MASKS)
@pytest.mark.parametrize("expected_rows", [None, 2])
def test_masked_fp8_rows_float_weights_match_formula(masked_m, expected_rows):
    """fp8 rows + scales against float32 weights: out[e, :m] = expert_e(fp8 * scale). expected_rows=2 gives
    each expert one row-block program, which must loop over all of its rows (up to 2 blocks here)."""
    num_experts, capacity, hidden, inter = 4, 19, 48, 32
    w13, w2 = weights(num_experts, hidden, inter, seed=4)
    q, s = deepep_like_rows(num_experts, capacity, hidden, 16, masked_m, seed=5)
    out = fused_moe.fused_experts_masked(
        q,
        torch.tensor(masked_m),
        w13,
        w2,
        x_scale=s,
        config=CFG,
        expected_rows=expected_rows,
        out_dtype=torch.float32,
    )
    assert out.shape == (num_experts, capacity, hidden) and out.dtype == torch.float32
    for e, m in enumerate(masked_m):
        want = swiglu64(dequant(q[e, :m], s[e, :m]), w13[e], w2[e])
        torch.testing.assert_close(out[e, :m], want, atol=1e-4, rtol=1e-4)


def fp8_weights(w13, w2):
    """(w13 fp8, w13 scales, w2 fp8, w2 scales): 128x128-style blocks per expert (leading dim batched)."""
    return (*fp8_quant.quantize_weight_block(w13, BLOCK), *fp8_quant.quantize_weight_block(w2, BLOCK))


def w8a8_reference(a, w13q, w13s, w2q, w2s):
    """a: the dequantised fp8 rows (float32); weights dequantised per block; the bf16 intermediate is
    quantised per token group of BLOCK[1] as the kernel does before the down GEMM."""
    w13 = fp8_quant.dequantize_block(w13q, w13s, BLOCK)
    w2 = fp8_quant.dequantize_block(w2q, w2s, BLOCK)
    inter = w13.shape[0] // 2
    mid = (F.silu(a @ w13[:inter].T) * (a @ w13[inter:].T)).to(torch.bfloat16)
    mq, ms = fp8_quant.quantize_per_token_group_reference(mid, BLOCK[1])
    return dequant(mq, ms) @ w2.T


@pytest.mark.parametrize("masked_m", [[0, 19, 5], [19, 1, 0]])
@pytest.mark.parametrize("act_group", [16, 32])  # 32: the activations' scale group is wider than the weights'
def test_masked_fp8_rows_fp8_weights_match_w8a8(masked_m, act_group):
    num_experts, capacity, hidden, inter = 3, 19, 64, 32
    w13q, w13s, w2q, w2s = fp8_weights(*weights(num_experts, hidden, inter, seed=6))
    q, s = deepep_like_rows(num_experts, capacity, hidden, act_group, masked_m, seed=7)
    out = fused_moe.fused_experts_masked(
        q,
        torch.tensor(masked_m),
        w13q,
        w2q,
        x_scale=s,
        w13_scale=w13s,
        w2_scale=w2s,
        block_shape=BLOCK,
        config=CFG,
    )
    assert out.dtype == torch.bfloat16
    for e, m in enumerate(masked_m):
        if m == 0:
            continue
        ref = w8a8_reference(dequant(q[e, :m], s[e, :m]), w13q[e], w13s[e], w2q[e], w2s[e])
        assert torch.isfinite(out[e, :m].float()).all()
        torch.testing.assert_close(out[e, :m].float(), ref, atol=5e-2 * ref.abs().max().item(), rtol=0)


def test_masked_fp8_rows_need_their_scales():
    w13, w2 = weights(2, 32, 16, seed=8)
    q, s = deepep_like_rows(2, 4, 32, 16, [1, 1], seed=9)
    with pytest.raises(ValueError, match="x_scale"):
        fused_moe.fused_experts_masked(q, torch.tensor([1, 1]), w13, w2, config=CFG)
    with pytest.raises(ValueError, match="one scale per row per group"):
        fused_moe.fused_experts_masked(q, torch.tensor([1, 1]), w13, w2, x_scale=s[:, :2], config=CFG)


# ---- the Experts layer's masked call (what the MoE layer runs on DeepEP low-latency rows) ----


@pytest.mark.parametrize("fp8_experts", [False, True])
def test_experts_forward_masked_takes_fp8_rows_and_scales(fp8_experts):
    """`Experts.forward_masked(rows, counts, scales=, expected_rows=)` with the layer's own weights (float32,
    or FP8 blocks via `to_fp8`) equals the formula on the dequantised rows."""
    from moefleet.engine.layers.experts import Experts

    num_experts, capacity, hidden, inter = 3, 19, 32, 16
    w13, w2 = weights(num_experts, hidden, inter, seed=10)
    layer = Experts(range(num_experts), hidden, inter)
    if fp8_experts:
        w13q, w13s, w2q, w2s = fp8_weights(w13, w2)
        layer.to_fp8(BLOCK)
        assert layer.w13_scale_inv is not None and layer.w2_scale_inv is not None
        layer.w13.data.copy_(w13q)
        layer.w2.data.copy_(w2q)
        layer.w13_scale_inv.copy_(w13s)
        layer.w2_scale_inv.copy_(w2s)
    else:
        layer.w13.data.copy_(w13)
        layer.w2.data.copy_(w2)
    masked_m = [7, 0, 19]
    q, s = deepep_like_rows(num_experts, capacity, hidden, 16, masked_m, seed=11)
    out = layer.forward_masked(q, torch.tensor(masked_m), scales=s, expected_rows=6)
    assert out.shape == (num_experts, capacity, hidden)
    assert out.dtype == (torch.bfloat16 if fp8_experts else torch.float32)  # the weights' dtype
    for e, m in enumerate(masked_m):
        if m == 0:
            continue
        a = dequant(q[e, :m], s[e, :m])
        if fp8_experts:
            ref = w8a8_reference(a, w13q[e], w13s[e], w2q[e], w2s[e])
            torch.testing.assert_close(out[e, :m].float(), ref, atol=5e-2 * ref.abs().max().item(), rtol=0)
        else:
            torch.testing.assert_close(out[e, :m], swiglu64(a, w13[e], w2[e]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="masked layout"):
        layer(q[0], counts=torch.tensor(masked_m), scales=s[0])
