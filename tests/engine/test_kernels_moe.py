"""Fused MoE Triton kernels on CPU (TRITON_INTERPRET=1) against slow torch references from the formula.

Tolerances: float32 inputs 1e-4 (the kernel sums K tiles in another order than the reference); FP8 paths are
compared with a reference that quantises exactly as the format says (per-token-group activations, block
weights, bf16 intermediate), at 5e-2 of the output's max magnitude: the kernel's and the reference's bf16
intermediates can differ by one bf16 ulp, which can move a requantised e4m3 value by one e4m3 step (6-12%
of that element; groups are only 16 wide here). Measured 0.7-1.8% over 6 seeds. The interpreter is slow: shapes are tiny, blocks 16.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU (CI): run the kernels in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moefleet.engine.kernels import fp8_quant, fused_moe  # noqa: E402
from moefleet.engine.kernels.fused_moe_configs import MoEConfig, default_config, pick_config  # noqa: E402
from moefleet.engine.kernels.moe_align import align_grouped, align_topk, max_padded_rows  # noqa: E402
from moefleet.engine.layers.experts import Experts, torch_path  # noqa: E402

if not fused_moe._INTERPRET:
    pytest.skip(
        "Triton kernels are compiled here (a GPU machine, or imported before TRITON_INTERPRET=1 was set): "
        "tests/gpu/test_moe_kernels_gpu.py covers them",
        allow_module_level=True,
    )

CFG = MoEConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1)
BLOCK = (16, 16)
F32 = dict(atol=1e-4, rtol=1e-4)


def weights(num_experts: int, hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return w13, w2


def swiglu(x, w13, w2):
    """One expert, written out in float64 (the oracle)."""
    inter = w13.shape[0] // 2
    x = x.double()
    return ((F.silu(x @ w13[:inter].double().T) * (x @ w13[inter:].double().T)) @ w2.double().T).float()


# ---- alignment ----


def check_aligned(aligned, expert_of_row: list[int], num_experts: int, block_m: int):
    num_rows = len(expert_of_row)
    sorted_ids = aligned.sorted_ids.tolist()
    expert_ids = aligned.expert_ids.tolist()
    total = int(aligned.num_padded.item())
    want_blocks = [e for e in range(num_experts) for _ in range(-(-expert_of_row.count(e) // block_m))]
    assert total == len(want_blocks) * block_m
    assert expert_ids[: len(want_blocks)] == want_blocks
    assert all(e == -1 for e in expert_ids[len(want_blocks) :])
    assert len(sorted_ids) == max_padded_rows(num_rows, num_experts, block_m) >= total
    for b, e in enumerate(want_blocks):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        real = [r for r in rows if r != num_rows]
        assert all(expert_of_row[r] == e for r in real)
        assert rows[: len(real)] == real  # padding only at the end of a block
    got = sorted(r for r in sorted_ids[:total] if r != num_rows)
    assert got == sorted(i for i, e in enumerate(expert_of_row) if 0 <= e < num_experts)
    assert all(r == num_rows for r in sorted_ids[total:])


@pytest.mark.parametrize(
    "ids",
    [
        [],  # 0 rows
        [2],  # 1 row
        [-1, -1, -1],  # nothing local
        [1] * 37,  # every row on one expert, > 2 blocks
        [0, 3, -1, 3, 3, 0, 1, 3, -1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0],  # skewed, experts 2 empty
    ],
)
def test_align_topk_matches_reference(ids):
    aligned = align_topk(torch.tensor(ids, dtype=torch.int64).view(-1, 1), 4, 8)
    check_aligned(aligned, ids, 4, 8)


def test_align_topk_random_2d():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 6, (33, 3), generator=g)
    check_aligned(align_topk(ids, 6, 16), ids.flatten().tolist(), 6, 16)


@pytest.mark.parametrize("counts", [[0, 0, 0], [5, 0, 17], [0, 1, 0], [16, 16, 32]])
def test_align_grouped_is_identity_within_groups(counts):
    aligned = align_grouped(torch.tensor(counts), sum(counts), 16)
    expert_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    check_aligned(aligned, expert_of_row, len(counts), 16)
    real = [r for r in aligned.sorted_ids.tolist() if r != sum(counts)]
    assert real == list(range(sum(counts)))


# ---- bf16/fp32 GEMMs ----


@pytest.mark.parametrize(
    "tokens,top_k,ids_kind",
    [(0, 2, "random"), (1, 1, "random"), (9, 2, "random"), (7, 2, "one_expert"), (6, 3, "none_local")],
)
def test_fused_topk_matches_reference(tokens, top_k, ids_kind):
    num_experts, hidden, inter = 4, 24, 40  # neither a multiple of the 16-wide blocks
    w13, w2 = weights(num_experts, hidden, inter)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.randint(-1, num_experts, (tokens, top_k), generator=g)
    if ids_kind == "one_expert":
        ids.fill_(2)
    elif ids_kind == "none_local":
        ids.fill_(-1)
    topk_weights = torch.rand(tokens, top_k, generator=g)
    out = fused_moe.fused_experts_topk(x, w13, w2, ids, topk_weights, config=CFG)
    ref = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(top_k):
            if ids[t, k] >= 0:
                ref[t] += topk_weights[t, k] * swiglu(x[t : t + 1], w13[ids[t, k]], w2[ids[t, k]])[0]
    assert out.shape == (tokens, hidden)
    torch.testing.assert_close(out, ref, **F32)


@pytest.mark.parametrize("counts", [[0, 0, 0, 0], [3, 0, 20, 1], [0, 0, 0, 1], [33, 0, 0, 0]])
def test_fused_grouped_matches_reference(counts):
    num_experts, hidden, inter = 4, 32, 16
    w13, w2 = weights(num_experts, hidden, inter, seed=1)
    x = torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(10))
    out = fused_moe.fused_experts_grouped(x, torch.tensor(counts), w13, w2, config=CFG)
    expert_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    ref = torch.stack(
        [swiglu(x[r : r + 1], w13[e], w2[e])[0] for r, e in enumerate(expert_of_row)] or [x[:0]]
    )
    torch.testing.assert_close(out, ref.view_as(out), **F32)


def test_fused_masked_matches_reference():
    num_experts, capacity, hidden, inter = 3, 19, 16, 32
    w13, w2 = weights(num_experts, hidden, inter, seed=2)
    x = torch.randn(num_experts, capacity, hidden, generator=torch.Generator().manual_seed(11))
    masked_m = torch.tensor([0, capacity, 5])
    out = fused_moe.fused_experts_masked(x, masked_m, w13, w2, config=CFG)
    assert out.shape == x.shape
    for e, m in enumerate(masked_m.tolist()):
        torch.testing.assert_close(out[e, :m], swiglu(x[e, :m], w13[e], w2[e]), **F32)


def test_default_configs_cover_all_sizes():
    assert default_config(8, 4, fp8=False).block_m == 16
    assert default_config(100_000, 4, fp8=True).block_k == 128
    # unknown shapes fall back to the default
    assert pick_config(3, 17, 19, 64, False) == default_config(64, 3, False)


# ---- FP8 ----


def test_quantize_per_token_group_matches_reference():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16) * 3
    x[1] = 0  # an all-zero row: scale eps, values 0
    q, s = fp8_quant.quantize_per_token_group(x, 16)
    q_ref, s_ref = fp8_quant.quantize_per_token_group_reference(x, 16)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=0)
    # hand-checked: group max maps to +-448, and dequantised values are within e4m3's 2^-3 relative step
    assert q[0, :16].float().abs().max() == 448.0
    restored = q.float() * s.repeat_interleave(16, 1)[:, :40]
    torch.testing.assert_close(restored, x.float(), atol=1e-6, rtol=0.0625)


def quantized_experts(w13, w2):
    """(w13 fp8, w13 scales, w2 fp8, w2 scales): 128x128-style blocks per expert (leading dim batched)."""
    return (*fp8_quant.quantize_weight_block(w13, BLOCK), *fp8_quant.quantize_weight_block(w2, BLOCK))


def fp8_expert_reference(x, w13q, w13s, w2q, w2s):
    """w8a8 from the format: dequantised block weights, per-token-group quantised activations."""

    def quant_dequant(a):
        q, s = fp8_quant.quantize_per_token_group_reference(a, BLOCK[1])
        return q.float() * s.repeat_interleave(BLOCK[1], 1)[:, : a.shape[1]]

    w13 = (
        w13q.float()
        * w13s.repeat_interleave(16, 0).repeat_interleave(16, 1)[: w13q.shape[0], : w13q.shape[1]]
    )
    w2 = w2q.float() * w2s.repeat_interleave(16, 0).repeat_interleave(16, 1)[: w2q.shape[0], : w2q.shape[1]]
    inter = w13.shape[0] // 2
    a = quant_dequant(x)
    mid = (F.silu(a @ w13[:inter].T) * (a @ w13[inter:].T)).to(x.dtype)
    return quant_dequant(mid) @ w2.T


def test_fp8_topk_matches_w8a8_reference():
    num_experts, hidden, inter, tokens, top_k = 3, 32, 32, 6, 2
    w13, w2 = weights(num_experts, hidden, inter, seed=4)
    w13q, w13s, w2q, w2s = quantized_experts(w13, w2)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [2, 1], [-1, -1], [0, 1]])
    topk_weights = torch.rand(tokens, top_k, generator=g)
    out = fused_moe.fused_experts_topk(
        x, w13q, w2q, ids, topk_weights, w13_scale=w13s, w2_scale=w2s, block_shape=BLOCK, config=CFG
    )
    assert out.dtype == torch.bfloat16
    ref = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(top_k):
            e = int(ids[t, k])
            if e >= 0:
                ref[t] += (
                    topk_weights[t, k]
                    * fp8_expert_reference(x[t : t + 1], w13q[e], w13s[e], w2q[e], w2s[e])[0]
                )
    torch.testing.assert_close(out.float(), ref, atol=5e-2 * ref.abs().max().item(), rtol=0)
    assert out[4].abs().max() == 0  # no local hit -> zero


def test_fp8_masked_matches_w8a8_reference():
    num_experts, capacity, hidden, inter = 2, 5, 16, 16
    w13, w2 = weights(num_experts, hidden, inter, seed=5)
    w13q, w13s, w2q, w2s = quantized_experts(w13, w2)
    x = torch.randn(num_experts, capacity, hidden, generator=torch.Generator().manual_seed(9)).to(
        torch.bfloat16
    )
    masked_m = torch.tensor([3, 0])
    out = fused_moe.fused_experts_masked(
        x, masked_m, w13q, w2q, w13_scale=w13s, w2_scale=w2s, block_shape=BLOCK, config=CFG
    )
    ref = fp8_expert_reference(x[0, :3], w13q[0], w13s[0], w2q[0], w2s[0])
    torch.testing.assert_close(out[0, :3].float(), ref, atol=5e-2 * ref.abs().max().item(), rtol=0)


def test_fp8_weights_must_come_with_scales():
    w13, w2 = weights(2, 16, 16)
    w13q, _, w2q, _ = quantized_experts(w13, w2)
    with pytest.raises(ValueError, match="both scales"):
        fused_moe.fused_experts_grouped(torch.zeros(1, 16), torch.tensor([1, 0]), w13q, w2q, config=CFG)


# ---- Experts layer: CPU torch paths (exact per expert, as transformers computes them) ----


@pytest.mark.parametrize("counts", [[2, 0, 3], [600, 0, 0, 0, 0, 0, 0, 1]])
def test_experts_cpu_paths(counts):
    num_experts, hidden, inter = len(counts), 8, 8
    experts = Experts(range(num_experts), hidden, inter)
    w13, w2 = weights(num_experts, hidden, inter, seed=6)
    experts.w13.data.copy_(w13)
    experts.w2.data.copy_(w2)
    x = torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(13))
    expect = "loop" if counts[0] == 600 else "padded"  # 8 x 600 padded rows > max(4 x 601, 4096)
    assert torch_path(counts, sum(counts)) == expect
    expert_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    ref = torch.cat(
        [
            F.linear(
                F.silu(F.linear(x[r : r + 1], w13[e, :inter])) * F.linear(x[r : r + 1], w13[e, inter:]), w2[e]
            )
            for r, e in enumerate(expert_of_row)
        ]
    )
    torch.testing.assert_close(experts(x, counts), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(experts(x, counts=torch.tensor(counts)), ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        experts(x)


def test_w8a8_block_linear_matches_reference():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(40, 48, generator=g)  # 40 rows: a ragged 16-row tile
    wq, ws = fp8_quant.quantize_weight_block(weight, BLOCK)
    x = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    out = fused_moe.w8a8_block_linear(x, wq, ws, BLOCK, config=CFG)
    assert out.shape == (5, 40) and out.dtype == torch.bfloat16
    q, s = fp8_quant.quantize_per_token_group_reference(x, 16)
    a = q.float() * s.repeat_interleave(16, 1)
    w = wq.float() * ws.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)
    ref = a @ w.T
    torch.testing.assert_close(out.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    assert fused_moe.w8a8_block_linear(x[:0], wq, ws, BLOCK, config=CFG).shape == (0, 40)


def test_tuned_table_picks_the_first_bucket_that_fits(monkeypatch):
    from moefleet.engine.kernels import fused_moe_configs as cfgs

    table = cfgs._table()
    key = "E=128,I=768,D=2048,dtype=bf16,device=NVIDIA_H200"
    assert key in table, "the checked-in table lost the Qwen3-30B-A3B entry"
    (small_rows, small), (large_rows, large) = table[key][0], table[key][-1]
    monkeypatch.setattr(cfgs, "_device_name", lambda: "NVIDIA_H200")
    assert cfgs.pick_config(128, 768, 2048, 1, False) == small
    assert cfgs.pick_config(128, 768, 2048, small_rows + 1, False) == table[key][1][1]
    assert cfgs.pick_config(128, 768, 2048, large_rows * 10, False) == large
