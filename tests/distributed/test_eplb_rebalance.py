"""EPLB live rebalance on the real engine, 4 ranks over gloo (float32): 8 routed experts + 4 redundant slots
(3 per rank). Greedy outputs equal a single-process run before, during (requests in flight while weights
move, one layer per step boundary) and after the rebalance; afterwards every rank's slot weights equal the
checkpoint's weights of the logical expert the new placement puts in that slot."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from moefleet.engine.llm_engine import LLM
from moefleet.engine.loader import safetensors_files
from moefleet.engine.sampling_params import SamplingParams
from safetensors import safe_open
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(240)]

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 8], list(range(300, 320)), [11, 400, 12], [9] * 7, [1, 2, 3]]
MAX_TOKENS = 6
RANKS, REDUNDANT = 4, 4


def checkpoint(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensors[name] = f.get_tensor(name)
    return tensors


def expected_slot(tensors, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    gate, up, down = (tensors[f"{prefix}.{s}_proj.weight"] for s in ("gate", "up", "down"))
    return torch.cat([gate, up]), down


def check_slot_weights(model_dir, results, slots_per_rank: int) -> None:
    """Every rank's slots hold the checkpoint weights of the expert the (common) new placement names."""
    tensors = checkpoint(model_dir)
    assert len({str(r["phy2log"]) for r in results}) == 1  # every rank installed the same placement
    phy2log = results[0]["phy2log"]
    for rank, result in enumerate(results):
        for i, after in enumerate(result["after_slots"]):
            assert after["local_experts"] == phy2log[i][rank * slots_per_rank : (rank + 1) * slots_per_rank]
            for slot, expert in enumerate(after["local_experts"]):
                w13, w2 = expected_slot(tensors, after["layer"], expert)
                assert torch.equal(after["w13"][slot], w13), (rank, i, slot, expert)
                assert torch.equal(after["w2"][slot], w2), (rank, i, slot, expert)


def reference_tokens(model_dir) -> list[list[int]]:
    with one_torch_thread():
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return [r.token_ids for r in LLM(str(model_dir), max_model_len=128).generate(PROMPTS, greedy)]


def test_live_rebalance_keeps_outputs_and_moves_checkpoint_weights(start_group):
    model_dir = tiny_model_dir("qwen3_norm_topk")
    options = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "redundant": REDUNDANT}
    group = start_group("eplb", 1, RANKS, options=options)
    codes = group.wait(timeout_s=200)
    assert codes == [0] * RANKS, [group.stderr(r)[-3000:] for r in range(RANKS)]
    results = group.results()
    reference = reference_tokens(model_dir)
    front = results[0]
    for tag, prefix in (("warmup", "w"), ("during", "s"), ("after", "a")):
        assert [front[tag][f"{prefix}{i}"] for i in range(len(PROMPTS))] == reference, tag

    rebalance = front["rebalance"]
    assert rebalance["moved_experts"] > 0 and rebalance["pause_seconds"] > 0
    assert 0 < rebalance["balancedness_before"] <= rebalance["predicted_balancedness"] <= 1
    state = front["state"]
    assert state["rebalances"] == 1 and 0 < state["balancedness"] <= 1
    assert state["placement"]["num_physical_experts"] == 12 and state["placement"]["slots_per_rank"] == 3

    phy2log = results[0]["phy2log"]
    start = [p % 8 for p in range(12)]
    assert any(layer != start for layer in phy2log)  # something really moved
    for layer_slots in phy2log:
        assert set(layer_slots) == set(range(8)) and len(layer_slots) == 12
    for rank, result in enumerate(results):
        assert [b["local_experts"] for b in result["before"]] == [start[rank * 3 : (rank + 1) * 3]] * 2
    check_slot_weights(model_dir, results, 3)
    # Hot experts got the spare slots: some expert has more than one replica in some layer.
    assert any(max(Counter(layer).values()) > 1 for layer in phy2log)


def test_automatic_rebalance_every_k_steps_on_deepseek_over_two_nodes(start_group):
    """DeepSeek-V3 (grouped routing: 4 groups over 2 nodes -> hierarchical policy, shared experts, a dense
    first layer), 16 experts + 2 redundant over 2 nodes x 1 rank, `--eplb-interval-steps 3`: the controller
    rebalances by itself while requests run; outputs and weights stay right."""
    model_dir = tiny_model_dir("deepseek_grouped")
    options = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "redundant": 2}
    group = start_group("eplb", 2, 1, options=options | {"interval": 3})
    codes = group.wait(timeout_s=200)
    assert codes == [0, 0], [group.stderr(r)[-3000:] for r in range(2)]
    results = group.results()
    reference = reference_tokens(model_dir)
    front = results[0]
    for tag, prefix in (("warmup", "w"), ("during", "s"), ("after", "a")):
        assert [front[tag][f"{prefix}{i}"] for i in range(len(PROMPTS))] == reference, tag
    assert results[0]["rebalances_total"] == results[1]["rebalances_total"] >= 2
    assert front["state"]["placement"]["slots_per_rank"] == 9
    check_slot_weights(model_dir, results, 9)
