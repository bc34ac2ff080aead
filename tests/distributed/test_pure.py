"""Pure decisions of the distributed package, tested without process groups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from moefleet.engine import topology
from moefleet.engine.distributed import deepep, groups
from moefleet.engine.distributed.a2a import plan_send, regroup_by_expert
from moefleet.engine.distributed.backends import make_dispatcher
from moefleet.engine.distributed.dp import StepInfo, pick_dp_rank, reduce_step_infos
from moefleet.engine.distributed.ep import apply_expert_parallel, count_routed_expert_parameters, moe_layers
from moefleet.engine.distributed.request_router import AbortRequest, AddRequest, Shutdown, route_messages
from moefleet.engine.distributed.watchdog import stale_ranks
from moefleet.engine.layers.token_dispatch import LocalDispatcher
from moefleet.engine.topology import Topology

# ---- a2a bookkeeping ---------------------------------------------------------------------------------


def test_plan_send_groups_hits_by_rank_and_local_expert():
    # T=3, K=2, E=4 over 2 ranks (L=2): rank 0 owns experts 0,1; rank 1 owns 2,3. -1 is padding.
    ids = torch.tensor([[3, 0], [1, -1], [3, 2]])
    plan = plan_send(ids, num_experts=4, world_size=2)
    assert plan.counts.tolist() == [[1, 1], [1, 2]]
    # Sent rows in (expert, token) order: e0:t0, e1:t1, e2:t2, e3:t0, e3:t2.
    assert plan.token_index.tolist() == [0, 1, 2, 0, 2]
    assert ids.reshape(-1)[plan.order].tolist() == [0, 1, 2, 3, 3]


def test_plan_send_rejects_bad_ids_and_divisibility():
    with pytest.raises(ValueError, match=r"num_experts \(6\) is not divisible by expert-parallel size \(4\)"):
        plan_send(torch.zeros(1, 1, dtype=torch.long), 6, 4)
    with pytest.raises(ValueError, match="expert id 9 but there are 8 experts"):
        plan_send(torch.tensor([[9]]), 8, 2)


def test_plan_send_empty_batch():
    plan = plan_send(torch.zeros(0, 3, dtype=torch.long), 8, 4)
    assert plan.counts.shape == (4, 2) and int(plan.counts.sum()) == 0 and plan.token_index.numel() == 0


@pytest.mark.parametrize("seed", range(5))
def test_regroup_by_expert_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    recv_counts = torch.randint(0, 4, (3, 4), generator=g)  # 3 sources, 4 local experts
    # Label each received row with (source, expert, index within block) in received order.
    labels = [(s, e, i) for s in range(3) for e in range(4) for i in range(int(recv_counts[s, e]))]
    perm = regroup_by_expert(recv_counts)
    regrouped = [labels[j] for j in perm.tolist()]
    assert regrouped == sorted(labels, key=lambda t: (t[1], t[0], t[2]))


def test_regroup_by_expert_nothing_received():
    assert regroup_by_expert(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


# ---- DP step agreement, rank picking, request routing ------------------------------------------------


def test_reduce_step_infos_prefill_any_run_any_tbo_all():
    infos = [
        StepInfo(num_tokens=5, is_prefill=False, has_work=True, can_use_tbo=True, can_use_graph=True),
        StepInfo(num_tokens=0, has_work=False),  # idle: does not veto TBO
        StepInfo(num_tokens=9, is_prefill=True, has_work=True, can_use_tbo=True, can_use_graph=True),
    ]
    step = reduce_step_infos(infos)
    assert step.run and step.is_prefill and step.use_tbo
    assert not step.use_graph  # prefill steps never replay decode graphs
    assert step.tokens_per_rank == (5, 0, 9) and step.max_tokens == 9
    assert step.is_idle(1) and not step.is_idle(0)


def test_reduce_step_infos_graphs_need_every_rank_idle_ones_included():
    """A graph step replays one bucket on every rank (idle ranks replay padding), so an idle rank without that
    graph vetoes it; the bucket comes from the most sequences any rank decodes."""
    working = StepInfo(num_tokens=3, has_work=True, can_use_graph=True)
    step = reduce_step_infos([working, StepInfo(can_use_graph=True), StepInfo(7, False, True, False, True)])
    assert step.use_graph and step.max_tokens == 7 and step.is_idle(1)
    assert not reduce_step_infos([working, StepInfo(can_use_graph=False)]).use_graph


def test_step_agreement_returns_the_group_graph_tokens():
    from moefleet.engine.distributed.dp import DPStepCoordinator
    from moefleet.engine.distributed.engine_glue import make_step_agreement
    from moefleet.engine.scheduler import SchedulerOutput

    alone = DPStepCoordinator(None)  # one rank: the all-gather is its own summary
    votes: list[bool] = [True]
    agree = make_step_agreement(alone, "off", graph_vote=lambda batch: votes[0])
    empty = SchedulerOutput(scheduled=[])
    assert agree(empty) == (False, False, False, None)  # nobody works: no forward at all
    decode = SimpleNamespace(num_tokens=3, is_prefill=False, is_empty=False)  # what the agreement reads
    assert agree(decode) == (True, False, False, 3)
    votes[0] = False  # e.g. more sequences than the largest captured bucket
    assert agree(decode) == (True, False, False, None)
    assert make_step_agreement(alone, "off")(decode)[3] is None  # no graph runner: never


def test_reduce_step_infos_tbo_vetoed_and_nobody_working():
    vetoed = reduce_step_infos([StepInfo(3, False, True, True, True), StepInfo(4, False, True, False, True)])
    assert vetoed.run and not vetoed.use_tbo and vetoed.use_graph and not vetoed.is_prefill
    nobody = reduce_step_infos([StepInfo(), StepInfo(is_prefill=True)])
    assert not nobody.run and not nobody.is_prefill and not nobody.is_idle(0)
    with pytest.raises(ValueError, match="at least one"):
        reduce_step_infos([])


def test_pick_dp_rank_least_load_with_rotating_ties():
    assert pick_dp_rank([5, 2, 7]) == 1
    assert pick_dp_rank([3, 3, 3], start=0) == 0
    assert pick_dp_rank([3, 3, 3], start=2) == 2
    assert pick_dp_rank([3, 1, 1], start=2) == 2
    with pytest.raises(ValueError):
        pick_dp_rank([])


def test_route_messages_places_by_load_and_routes_aborts_to_owner():
    owners: dict[str, int] = {}
    inbox = [AddRequest("a", None, cost=10), AddRequest("b", None, cost=1), AddRequest("c", None, cost=1)]
    per_rank = route_messages(inbox, [0, 5], owners)
    # a -> rank 0 (load 0 -> 10), b -> rank 1 (5 -> 6), c -> rank 1 (6 < 10).
    assert owners == {"a": 0, "b": 1, "c": 1}
    assert [[m.request_id for m in msgs] for msgs in per_rank] == [["a"], ["b", "c"]]
    aborts = route_messages([AbortRequest("c"), AbortRequest("unknown")], [0, 0], owners)
    assert aborts == [[], [AbortRequest("c")]]
    assert route_messages([Shutdown()], [0, 0, 0], owners) == [[Shutdown()]] * 3


# ---- start-up validation -----------------------------------------------------------------------------


def test_launch_config_from_env_rank_formula_and_errors():
    env = {
        "MOEFLEET_NNODES": "3",
        "MOEFLEET_NODE_RANK": "2",
        "MOEFLEET_NPROC_PER_NODE": "8",
        "MOEFLEET_LOCAL_RANK": "5",
        "MASTER_ADDR": "moe-0.moe",
        "MASTER_PORT": "29600",
    }
    launch = Topology.from_env(env)
    assert (launch.rank, launch.world_size, launch.master_addr) == (21, 24, "moe-0.moe")
    with pytest.raises(ValueError, match=r"node_rank \(3\) must be in \[0, nnodes \(3\)\)"):
        Topology.from_env({**env, "MOEFLEET_NODE_RANK": "3"})
    with pytest.raises(ValueError, match=r"MOEFLEET_NPROC_PER_NODE \('eight'\) must be an integer"):
        Topology.from_env({**env, "MOEFLEET_NPROC_PER_NODE": "eight"})


def test_visible_gpu_and_divisibility_messages():
    with pytest.raises(
        ValueError, match=r"nproc_per_node \(8\) is larger than the number of visible GPUs \(4\)"
    ):
        groups.check_visible_gpus(8, 4)
    groups.check_visible_gpus(4, 8)
    with pytest.raises(
        ValueError, match=r"num_experts \(63\) is not divisible by expert-parallel size \(8\)"
    ):
        groups.check_experts_divisible(63, 8)


def test_fingerprint_mismatch_names_values_on_both_sides():
    a = groups.Fingerprint(4, groups.model_config_hash({"x": 1, "y": 2}))
    assert a.model_hash == groups.model_config_hash({"y": 2, "x": 1})  # key order does not matter
    groups.check_fingerprints([a, a])
    with pytest.raises(RuntimeError, match=r"moefleet version: rank 0 has '0.1.0', rank 1 has '9.9'"):
        groups.check_fingerprints([a, groups.Fingerprint(4, a.model_hash, "9.9")])
    with pytest.raises(RuntimeError, match=r"world size .*rank 0 has 4, rank 2 has 8"):
        groups.check_fingerprints([a, a, groups.Fingerprint(8, a.model_hash)])


def test_stale_ranks():
    assert stale_ranks({1: 10.0, 2: 3.0, 3: 9.5}, now=12.0, timeout_s=5.0) == [2]


# ---- backends and EP application ---------------------------------------------------------------------


@pytest.mark.skipif(deepep.deep_ep_available(), reason="deep_ep is installed here")
def test_deepep_absent_gives_install_hint():
    with pytest.raises(RuntimeError, match=r"build DeepEP from source.*or use --moe-backend a2a"):
        make_dispatcher("deepep", None, 8, device_type="cuda")


def test_expand_hits_groups_received_tokens_by_local_expert():
    # DeepEP normal mode: received tokens with local expert ids, -1 where the expert is on another rank.
    order, token_index, counts = deepep.expand_hits(torch.tensor([[1, -1], [0, 1], [-1, -1]]), 2)
    assert counts == [1, 2] and token_index.tolist() == [1, 0, 1]


class _Experts(torch.nn.Module):
    def __init__(self, num_experts: int):
        super().__init__()
        self.local_experts = topology.current().local_experts(num_experts)
        self.w = torch.nn.Parameter(torch.zeros(len(self.local_experts), 3))


class _MoE(torch.nn.Module):
    def __init__(self, num_experts: int = 4):
        super().__init__()
        self.experts = _Experts(num_experts)
        self.dispatcher = LocalDispatcher(len(self.experts.local_experts))


def test_apply_expert_parallel_single_rank_and_wrong_layout():
    model = torch.nn.Sequential(_MoE(), torch.nn.Linear(2, 2), _MoE())
    assert [name for name, _ in moe_layers(model)] == ["0", "2"]
    assert apply_expert_parallel(model, None, "auto", num_micro_batches=2) == 2
    layer = model[0]
    assert len(layer.dispatchers) == 2 and layer.dispatchers[0] is not layer.dispatchers[1]
    assert layer.dispatcher is layer.dispatchers[0] and isinstance(layer.dispatcher, LocalDispatcher)
    assert count_routed_expert_parameters(model) == 2 * 4 * 3
    with pytest.raises(ValueError, match="num_micro_batches"):
        apply_expert_parallel(model, None, num_micro_batches=3)


def test_has_fp8_experts_picks_deepep_low_latency_row_format():
    """DeepEP low-latency dispatches FP8 rows for block-FP8 experts and bf16 rows otherwise (build_engine and
    the bench pass `has_fp8_experts(model)` as `deepep_ll_fp8`)."""
    from moefleet.engine.distributed.ep import has_fp8_experts
    from moefleet.engine.fp8_weights import quantize_model
    from moefleet.engine.loader import load_model
    from support.tiny_models import tiny_model_dir

    model = load_model(tiny_model_dir("deepseek_grouped"), "cpu", torch.float32)
    assert not has_fp8_experts(model)
    quantize_model(model, block=(16, 16))
    assert has_fp8_experts(model)
    assert not has_fp8_experts(torch.nn.Sequential(torch.nn.Linear(2, 2)))  # no MoE layers at all
