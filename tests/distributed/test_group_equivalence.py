"""Real gloo groups (2 and 4 ranks, laid out as nodes x processes): expert-parallel dispatch/combine, an
expert-sharded MoE model, the DP step agreement and request hand-over all match single-process references
computed here in the test process."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import topology
from moefleet.engine.distributed.dp import reduce_step_infos
from moefleet.engine.distributed.ep import count_routed_expert_parameters
from moefleet.engine.distributed.request_router import AddRequest
from moefleet.engine.layers.token_dispatch import LocalDispatcher

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def reference_dispatch(worker, case):
    """Everything on one process: LocalDispatcher over all experts, same stand-in experts."""
    local = LocalDispatcher(worker.NUM_EXPERTS)
    d = local.dispatch_finish(local.dispatch_start(case["hidden"], case["ids"], case["w"]))
    out = worker.run_experts(d.hidden, d.tokens_per_expert, 0)
    return d, local.combine_finish(local.combine_start(out, d))


@pytest.mark.parametrize("nnodes,nproc_per_node", [(1, 2), (2, 2)], ids=["ep2", "ep4-2nodes"])
def test_group_matches_single_process(start_group, worker_module, nnodes, nproc_per_node):
    world = nnodes * nproc_per_node
    group = start_group("all", nnodes, nproc_per_node)
    codes = group.wait(timeout_s=90)
    assert codes == [0] * world, [group.stderr(r)[-2000:] for r in range(world)]
    results = group.results()
    cases = worker_module.dispatch_cases(world)
    local_experts = worker_module.NUM_EXPERTS // world

    # 1. dispatch rows and combine outputs equal the one-process LocalDispatcher run.
    for index, case in enumerate(cases):
        ref_dispatched, ref_out = reference_dispatch(worker_module, case)
        ref_starts = [0, *torch.tensor(ref_dispatched.tokens_per_expert).cumsum(0).tolist()]
        for rank, result in enumerate(results):
            got = result["cases"][index]
            mine = worker_module.rank_slice(case, rank)
            torch.testing.assert_close(got["out"], ref_out[mine], msg=f"{case['kind']} rank {rank}")
            # Rows for global expert g = rank * L + e, in source-rank then token order = reference order.
            experts = range(rank * local_experts, (rank + 1) * local_experts)
            assert got["counts"] == [ref_dispatched.tokens_per_expert[g] for g in experts], case["kind"]
            expected_rows = ref_dispatched.hidden[ref_starts[experts.start] : ref_starts[experts.stop]]
            torch.testing.assert_close(got["rows"], expected_rows, msg=f"{case['kind']} rank {rank}")
    assert any(sum(c["tokens"]) and 0 in c["tokens"] for c in cases), "cases must include idle ranks"

    # 2. two micro-batches in flight at once give the same results as one at a time.
    for micro, case in enumerate(cases[:2]):
        _, ref_out = reference_dispatch(worker_module, case)
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["tbo"][micro], ref_out[worker_module.rank_slice(case, rank)])

    # 3. expert-sharded model == unsharded model; each rank holds 1/EP of the routed-expert parameters.
    topology.set_current(topology.Topology())
    full = worker_module.ToyModel()
    tokens, x = worker_module.moe_inputs(world)
    with torch.no_grad():
        ref = full(x)
    total = count_routed_expert_parameters(full)
    starts = [0, *torch.tensor(tokens).cumsum(0).tolist()]
    for rank, result in enumerate(results):
        assert result["moe_layers"] == 2
        assert result["expert_params"] * world == total
        torch.testing.assert_close(
            result["moe_out"], ref[starts[rank] : starts[rank + 1]], rtol=1e-5, atol=1e-5
        )

    # 4. every rank reached the same DP decision, equal to the pure reduction.
    for step in range(6):
        expected = reduce_step_infos(worker_module.dp_infos(world, step))
        assert [r["dp"][step] for r in results] == [expected] * world

    # 5. request hand-over: each request lands once, on the least-loaded rank; abort reaches the owner.
    placed = {
        m.request_id: rank
        for rank, r in enumerate(results)
        for step in r["router_got"]
        for m in step
        if isinstance(m, AddRequest)
    }
    assert sorted(placed) == [f"r{i}" for i in range(7)]
    assert results[0]["router_owners"] == placed
    # The front end holds every rank's engine stats of the last (third) exchange, in rank order: what its
    # /metrics sums over the group.
    assert results[0]["router_rank_stats"] == [
        {"num_running": float(r + 1), "kv_blocks_used": float(10 * r + 2)} for r in range(len(results))
    ]
    owner_of_r3 = placed["r3"]
    aborts = [m.request_id for m in results[owner_of_r3]["router_got"][0] if not isinstance(m, AddRequest)]
    assert aborts == ["r3"]
    # Loads reported at step 0 were 10 * rank, so the first (cheapest) requests go to rank 0.
    assert placed["r0"] == 0
    # Outputs (the ids each rank received) come back to the front end at the next exchange.
    delivered = {rid for rank, outs in results[0]["router_delivered"] for rid in outs}
    assert delivered == set(placed)
