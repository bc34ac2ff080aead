"""MoE layer: route -> map -> dispatch -> experts -> combine equals a dense per-token reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moefleet.engine import parallel_layout
from moefleet.engine.layers.mlp import GatedMLP
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.router import RoutingConfig
from moefleet.engine.parallel_layout import ParallelLayout

DIM, INTER, EXPERTS = 16, 8, 8


def make_moe(routing: RoutingConfig, shared: bool = False) -> MoE:
    torch.manual_seed(0)
    moe = MoE(DIM, INTER, routing, shared_experts=GatedMLP(DIM, 12) if shared else None)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def dense_reference(moe: MoE, hidden: torch.Tensor) -> torch.Tensor:
    weights, ids = moe.gate(hidden)
    out = torch.zeros_like(hidden)
    inter = moe.experts.intermediate_size
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            w13, w2 = moe.experts.w13[e], moe.experts.w2[e]
            h = F.silu(hidden[t] @ w13[:inter].T) * (hidden[t] @ w13[inter:].T)
            out[t] += weights[t, k] * (h @ w2.T)
    if moe.shared_experts is not None:
        out += moe.shared_experts(hidden)
    return out


@pytest.mark.parametrize(
    "routing",
    [
        RoutingConfig(EXPERTS, 2, "softmax", norm_topk_prob=False),
        RoutingConfig(
            EXPERTS,
            3,
            "sigmoid",
            True,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            correction_bias=True,
        ),
    ],
)
def test_moe_matches_dense_reference(routing):
    moe = make_moe(routing, shared=routing.scoring == "sigmoid")
    hidden = torch.randn(24, DIM)
    torch.testing.assert_close(moe(hidden), dense_reference(moe, hidden), atol=1e-5, rtol=1e-5)
    assert moe(torch.zeros(0, DIM)).shape == (0, DIM)


def test_logical_to_physical_map_sits_between_routing_and_dispatch():
    moe = make_moe(RoutingConfig(EXPERTS, 2))
    hidden = torch.randn(10, DIM)
    expected = moe(hidden)
    # Store logical expert l in physical slot perm[l], and tell the map: same output.
    perm = torch.randperm(EXPERTS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w13, w2 = moe.experts.w13.clone(), moe.experts.w2.clone()
        moe.experts.w13[perm] = w13
        moe.experts.w2[perm] = w2
        moe.logical_to_physical.copy_(perm)
    torch.testing.assert_close(moe(hidden), expected)


def test_expert_parallel_layout_keeps_only_local_experts():
    parallel_layout.set_layout(ParallelLayout(ep_rank=1, ep_size=2))
    try:
        moe = MoE(DIM, INTER, RoutingConfig(EXPERTS, 2))
    finally:
        parallel_layout.set_layout(ParallelLayout())
    experts = moe.experts
    assert experts.local_experts == range(4, 8)
    assert experts.w13.shape == (4, 2 * INTER, DIM) and experts.w2.shape == (4, DIM, INTER)
    for e in range(EXPERTS):
        for shard, shape in (("gate", (INTER, DIM)), ("up", (INTER, DIM)), ("down", (DIM, INTER))):
            param = experts.w2 if shard == "down" else experts.w13
            param.weight_loader(param, torch.full(shape, float(e)), e, shard)
    assert experts.missing() == []
    assert experts.w13[:, 0, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert experts.w2[:, 0, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(RuntimeError, match="expert-parallel dispatcher"):
        moe(torch.randn(3, DIM))


def test_expert_loader_rejects_wrong_shapes():
    moe = make_moe(RoutingConfig(EXPERTS, 2))
    with pytest.raises(ValueError, match="expert 2 up_proj has shape"):
        moe.experts.w13.weight_loader(moe.experts.w13, torch.zeros(INTER + 1, DIM), 2, "up")


def test_expert_load_counts_physical_hits():
    moe = make_moe(RoutingConfig(EXPERTS, 2))
    hidden = torch.randn(30, DIM)
    _, ids = moe.gate(hidden)
    moe.logical_to_physical.copy_(torch.arange(EXPERTS).flip(0))  # physical = 7 - logical
    moe.expert_load = torch.zeros(EXPERTS, dtype=torch.long)
    moe(hidden)
    moe(torch.zeros(0, DIM))
    assert moe.expert_load.tolist() == torch.bincount(7 - ids.flatten(), minlength=EXPERTS).tolist()


def swiglu_rows_reference(w13: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Slow oracle from the SwiGLU formula, one row and one output element at a time, float64:
    out_j = sum_i silu(g_i) * u_i * W2[j, i] with g = W_gate x, u = W_up x and silu(g) = g / (1 + e^-g)."""
    inter = w2.shape[1]
    w13, w2 = w13.double(), w2.double()
    out = torch.zeros(rows.shape[0], w2.shape[0], dtype=torch.float64)
    for r, x in enumerate(rows.double()):
        gate = [float((w13[i] * x).sum()) for i in range(inter)]
        up = [float((w13[inter + i] * x).sum()) for i in range(inter)]
        act = [g / (1.0 + math.exp(-g)) * u for g, u in zip(gate, up, strict=True)]
        for j in range(w2.shape[0]):
            out[r, j] = sum(a * float(w2[j, i]) for i, a in enumerate(act))
    return out


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 0, 2, 7], [40, 0, 0, 0, 0, 0, 0, 1], [0] * 8])
def test_expert_paths_match_the_formula(counts):
    """Every path (padded, per-expert loop, and whichever `forward` picks) equals the slow formula on every row;
    with no rows at all every path returns an empty [0, D] (the oracle for that case is its shape)."""
    moe = make_moe(RoutingConfig(EXPERTS, 2))
    hidden = torch.randn(sum(counts), DIM)
    expected = torch.zeros(0, DIM, dtype=torch.float64)
    start = 0
    for e, c in enumerate(counts):
        rows = hidden[start : start + c]
        expected = torch.cat([expected, swiglu_rows_reference(moe.experts.w13[e], moe.experts.w2[e], rows)])
        start += c
    assert expected.shape == (sum(counts), DIM)
    experts = moe.experts
    for path in (experts.forward_loop, experts.forward_padded, experts):
        got = path(hidden, counts)
        assert got.shape == (sum(counts), DIM) and got.dtype == hidden.dtype
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
