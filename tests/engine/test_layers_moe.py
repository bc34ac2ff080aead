"""MoE layer: route -> map -> dispatch -> experts -> combine equals a dense per-token reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moefleet.engine import topology
from moefleet.engine.layers.mlp import GatedMLP
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.router import RoutingConfig
from moefleet.engine.topology import Topology

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
        moe.logical_to_physical.copy_(perm.unsqueeze(1))
    torch.testing.assert_close(moe(hidden), expected)


def test_redundant_slots_hold_replicas_and_outputs_do_not_change():
    """8 experts in 12 slots: the loader fills every slot holding an expert (slot 8 holds expert 0, ...), the
    layer picks a replica per (token, expert) on device, and the output equals the dense reference."""
    routing = RoutingConfig(EXPERTS, 2)
    plain = make_moe(routing)
    topology.set_current(Topology(num_redundant_experts=4))
    try:
        moe = MoE(DIM, INTER, routing)
    finally:
        topology.set_current(Topology())
    assert moe.experts.local_experts == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert moe.logical_replicas.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert moe.logical_to_physical[0].tolist() == [0, 8] + [-1] * 3
    with torch.no_grad():
        moe.gate.weight.copy_(plain.gate.weight)
    for e in range(EXPERTS):
        for shard in ("gate", "up", "down"):
            inter = slice(0, INTER) if shard == "gate" else slice(INTER, 2 * INTER)
            w = plain.experts.w2[e] if shard == "down" else plain.experts.w13[e, inter]
            param = moe.experts.w2 if shard == "down" else moe.experts.w13
            param.weight_loader(param, w, e, shard)
    assert moe.experts.missing() == []
    torch.testing.assert_close(moe.experts.w13[8], plain.experts.w13[0])
    hidden = torch.randn(40, DIM)
    hits = []
    moe.dispatcher.dispatch_start = _spy(moe.dispatcher.dispatch_start, hits)  # type: ignore[method-assign]
    torch.testing.assert_close(moe(hidden), dense_reference(plain, hidden))
    # One rank holds both replicas of expert 0: the first local one (slot 0) takes its rows.
    physical = hits[0]
    _, logical = plain.gate(hidden)
    assert (logical == 0).any() and set(physical[logical == 0].tolist()) == {0}
    assert int(physical.max()) < 12


def _spy(fn, seen):
    def wrapper(hidden, topk_ids, topk_weights, **kwargs):
        seen.append(topk_ids.clone())
        return fn(hidden, topk_ids, topk_weights, **kwargs)

    return wrapper


def test_replica_on_own_rank_is_preferred():
    from moefleet.engine.eplb.expert_location import ExpertLocation, choose_replicas

    # 4 experts in 6 slots over 3 ranks: rank 0 holds [0, 1], ranks 1 and 2 both hold [2, 3].
    location = ExpertLocation(4, 3, [[0, 1, 2, 3, 2, 3]])
    log2phy, replicas = location.layer_tensors(0)
    ids = torch.tensor([[0, 2], [2, 3], [3, 1], [1, 2]])
    # Rank 0 has no replica of 2 or 3: token t takes replica t mod 2 (slots 2/4 and 3/5).
    assert choose_replicas(ids, log2phy, replicas, 0, 2).tolist() == [[0, 2], [4, 5], [3, 1], [1, 4]]
    # Ranks 1 and 2 keep experts 2 and 3 at home.
    assert choose_replicas(ids, log2phy, replicas, 1, 2).tolist() == [[0, 2], [2, 3], [3, 1], [1, 2]]
    assert choose_replicas(ids, log2phy, replicas, 2, 2).tolist() == [[0, 4], [4, 5], [5, 1], [1, 4]]


def test_replica_on_own_node_is_preferred_next():
    from moefleet.engine.eplb.expert_location import ExpertLocation, choose_replicas

    # 4 experts, 8 slots, 4 ranks of 2 slots, 2 ranks per node. Expert 3 lives on ranks 1 (node 0), 2 and 3
    # (node 1); expert 2 only on rank 1 (node 0).
    location = ExpertLocation(4, 4, [[0, 1, 2, 3, 3, 0, 3, 1]])
    log2phy, replicas = location.layer_tensors(0)
    ids = torch.tensor([[3, 2], [3, 2], [3, 0], [3, 1]])
    # Rank 0 (node 0): its node's only replica of 3 is slot 3; expert 2 -> slot 2; 0 and 1 are local.
    assert choose_replicas(ids, log2phy, replicas, 0, 2, 2).tolist() == [[3, 2], [3, 2], [3, 0], [3, 1]]
    # Rank 2 holds slot 4 (expert 3) and 5 (expert 0): local. Expert 1 on node 1 is slot 7 (rank 3).
    assert choose_replicas(ids, log2phy, replicas, 2, 2, 2).tolist() == [[4, 2], [4, 2], [4, 5], [4, 7]]
    # Without node information rank 0 spreads expert 3 over slots 3, 4, 6 by token index.
    assert choose_replicas(ids, log2phy, replicas, 0, 2).tolist() == [[3, 2], [4, 2], [6, 0], [3, 1]]


def test_node_replicas_are_spread_by_token():
    from moefleet.engine.eplb.expert_location import ExpertLocation, choose_replicas

    # 2 experts, 8 slots, 4 ranks x 2 slots, 2 ranks per node: slots hold [0, 0 | 1, 1 || 1, 0 | 1, 0].
    location = ExpertLocation(2, 4, [[0, 0, 1, 1, 1, 0, 1, 0]])
    log2phy, replicas = location.layer_tensors(0)
    ids = torch.ones(4, 1, dtype=torch.long)  # four tokens, all for expert 1
    # Rank 0 has no replica; its node's are slots 2 and 3 (rank 1): token t takes the (t mod 2)-th.
    assert choose_replicas(ids, log2phy, replicas, 0, 2, 2).flatten().tolist() == [2, 3, 2, 3]
    # Ranks with a local replica use their first one.
    assert choose_replicas(ids, log2phy, replicas, 1, 2, 2).flatten().tolist() == [2, 2, 2, 2]
    assert choose_replicas(ids, log2phy, replicas, 2, 2, 2).flatten().tolist() == [4, 4, 4, 4]
    # Without node information: spread over all four replicas (slots 2, 3, 4, 6).
    assert choose_replicas(ids, log2phy, replicas, 0, 2).flatten().tolist() == [2, 3, 4, 6]


def test_expert_parallel_layout_keeps_only_local_experts():
    topology.set_current(Topology.for_rank(1, 2))
    try:
        moe = MoE(DIM, INTER, RoutingConfig(EXPERTS, 2))
    finally:
        topology.set_current(Topology())
    experts = moe.experts
    assert experts.local_experts == [4, 5, 6, 7]
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


def test_expert_load_counts_logical_hits():
    moe = make_moe(RoutingConfig(EXPERTS, 2))
    hidden = torch.randn(30, DIM)
    _, ids = moe.gate(hidden)
    moe.logical_to_physical.copy_(torch.arange(EXPERTS).flip(0).unsqueeze(1))  # physical = 7 - logical
    moe.expert_load = torch.zeros(EXPERTS, dtype=torch.long)
    moe(hidden)
    moe(torch.zeros(0, DIM))
    assert moe.expert_load.tolist() == torch.bincount(ids.flatten(), minlength=EXPERTS).tolist()


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
