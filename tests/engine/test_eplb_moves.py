"""EPLB weight moves: the pure transfer plan, and applying it on one rank (local copies through staging, so
swapped slots never read an already overwritten row); outputs are unchanged after the move."""

from __future__ import annotations

import torch
from moefleet.engine import topology
from moefleet.engine.eplb.expert_location import ExpertLocation
from moefleet.engine.eplb.rebalance import Move, apply_layers, plan_moves
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.router import RoutingConfig
from moefleet.engine.topology import Topology


def test_unchanged_slots_do_not_move_and_local_copies_win():
    # 2 ranks x 3 slots. Old: [0 1 2 | 3 0 1]; new: [0 3 2 | 3 1 1].
    moves = plan_moves(0, [0, 1, 2, 3, 0, 1], [0, 3, 2, 3, 1, 1], 3)
    # Slot 1 needs expert 3: only rank 1 has it (slot 3). Slot 4 needs expert 1: rank 1 has it at slot 5.
    assert moves == [Move(0, 1, 3, 3), Move(0, 4, 5, 1)]


def test_sources_are_spread_over_holders():
    # Expert 0 held by slots 0 and 2 (ranks 0, 1); ranks 2 and 3 both need it.
    moves = plan_moves(3, [0, 1, 0, 1, 2, 3, 2, 3], [0, 1, 0, 1, 0, 3, 0, 3], 2)
    assert [(m.dst, m.src) for m in moves] == [(4, 0), (6, 0)]
    moves = plan_moves(3, [0, 1, 0, 1, 2, 3, 2, 3], [0, 1, 0, 1, 2, 0, 2, 0], 2)
    assert [(m.dst, m.src) for m in moves] == [(5, 2), (7, 2)]  # slot index picks among holders [0, 2]


def _moe(redundant: int) -> MoE:
    topology.set_current(Topology(num_redundant_experts=redundant))
    try:
        torch.manual_seed(0)
        moe = MoE(16, 8, RoutingConfig(4, 2))
    finally:
        topology.set_current(Topology())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # replicas start equal to their expert
        for slot, expert in enumerate(moe.experts.local_experts):
            moe.experts.w13[slot] = moe.experts.w13[expert]
            moe.experts.w2[slot] = moe.experts.w2[expert]
    return moe


def test_apply_on_one_rank_swaps_through_staging_and_keeps_outputs():
    moe = _moe(redundant=2)  # 6 slots: [0 1 2 3 0 1]
    hidden = torch.randn(20, 16)
    expected = moe(hidden)
    w13 = {e: moe.experts.w13[e].clone() for e in range(4)}
    old = ExpertLocation(4, 1, [[0, 1, 2, 3, 0, 1]])
    new = ExpertLocation(4, 1, [[1, 0, 3, 2, 3, 3]])  # swaps and a new double replica
    moved = apply_layers([moe], old, new, [0], rank=0, group=None)
    assert moved == 6
    assert moe.experts.local_experts == [1, 0, 3, 2, 3, 3]
    for slot, expert in enumerate(moe.experts.local_experts):
        assert torch.equal(moe.experts.w13[slot], w13[expert])
    assert moe.logical_replicas.tolist() == [1, 1, 1, 3]
    assert moe.logical_to_physical[3].tolist() == [2, 4, 5]
    torch.testing.assert_close(moe(hidden), expected)
