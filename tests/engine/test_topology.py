"""Topology: the one description of a launch (ranks, sizes, env parsing, validation, the build-time current)."""

from __future__ import annotations

import pytest
from moefleet.engine import topology
from moefleet.engine.topology import Topology


def test_ranks_and_sizes_by_hand():
    t = Topology(nnodes=3, nproc_per_node=8, node_rank=2, local_rank=5)
    # 2 * 8 + 5: the rank formula of the launch contract.
    assert (t.world_size, t.rank, t.dp_rank, t.ep_rank) == (24, 21, 21, 21)
    assert (t.dp_size, t.ep_size, t.tp_size, t.ranks_per_node) == (24, 24, 1, 8)
    assert not t.is_front_end and t.multi_process
    assert [t.global_rank(i) for i in range(8)] == list(range(16, 24))
    assert Topology().world_size == 1 and Topology().is_front_end and not Topology().multi_process


def test_local_experts_block():
    t = Topology.for_rank(3, 4)
    assert t.local_experts(16) == range(12, 16)
    with pytest.raises(
        ValueError, match=r"num_experts \(10\) is not divisible by expert-parallel size \(4\)"
    ):
        t.local_experts(10)


def test_for_rank_places_nodes():
    t = Topology.for_rank(5, 8, ranks_per_node=4, num_redundant_experts=2)
    assert (t.nnodes, t.nproc_per_node, t.node_rank, t.local_rank, t.rank) == (2, 4, 1, 1, 5)
    assert t.num_redundant_experts == 2
    with pytest.raises(ValueError, match=r"rank \(8\) must be in \[0, world_size \(8\)\)"):
        Topology.for_rank(8, 8)
    with pytest.raises(ValueError, match="positive multiple of ranks_per_node"):
        Topology.for_rank(0, 6, ranks_per_node=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 0}, r"nnodes \(0\) must be >= 1 \(set --nnodes / MOEFLEET_NNODES\)"),
        ({"nnodes": 2, "node_rank": 2}, r"node_rank \(2\) must be in \[0, nnodes \(2\)\)"),
        ({"nproc_per_node": 2, "local_rank": 2}, r"local_rank \(2\) must be in \[0, nproc_per_node \(2\)\)"),
        ({"master_port": 0}, r"master_port \(0\) must be in 1..65535"),
        ({"master_addr": ""}, "master_addr must not be empty"),
        ({"num_redundant_experts": -1}, r"num_redundant_experts \(-1\) must be >= 0"),
        ({"nproc_per_node": 4, "tp_size": 2}, "tensor-parallel attention is not built"),
        ({"nproc_per_node": 4, "dp_size": 2}, r"dp_size \(2\) x tp_size \(1\) must equal the world size"),
        ({"nproc_per_node": 4, "ep_size": 2}, r"ep_size \(2\) must equal the world size \(4\)"),
    ],
)
def test_validation_names_field_value_and_how_to_set_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Topology(**kwargs)


def test_from_env_explicit_values_win_then_env_then_defaults():
    env = {
        "MOEFLEET_NNODES": "3",
        "MOEFLEET_NODE_RANK": "2",
        "MOEFLEET_NPROC_PER_NODE": "8",
        "MOEFLEET_LOCAL_RANK": "5",
        "MASTER_ADDR": "torchrun-master",
        "MOEFLEET_MASTER_ADDR": "moe-0.moe",
        "MASTER_PORT": "29600",
    }
    t = Topology.from_env(env)
    assert (t.rank, t.world_size, t.master_addr, t.master_port) == (21, 24, "moe-0.moe", 29600)
    t = Topology.from_env({**env, "MOEFLEET_MASTER_PORT": "29700"}, nnodes=4, local_rank=0, master_addr="x")
    assert (t.nnodes, t.node_rank, t.local_rank, t.master_addr, t.master_port) == (4, 2, 0, "x", 29700)
    assert Topology.from_env({}) == Topology()
    with pytest.raises(ValueError, match=r"MOEFLEET_NNODES \('two'\) must be an integer"):
        Topology.from_env({"MOEFLEET_NNODES": "two"})


def test_frozen_and_with_local_rank_validates():
    t = Topology(nproc_per_node=2)
    with pytest.raises(AttributeError):
        t.nnodes = 2  # type: ignore[misc]
    assert t.with_local_rank(1).rank == 1
    with pytest.raises(ValueError, match="local_rank"):
        t.with_local_rank(2)


def test_use_sets_and_restores_current():
    before = topology.current()
    with topology.use(Topology.for_rank(1, 2)) as inside:
        assert topology.current() is inside and topology.current().ep_rank == 1
    assert topology.current() is before
