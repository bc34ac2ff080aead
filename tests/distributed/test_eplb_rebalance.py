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


def test_live_rebalance_keeps_outputs_and_moves_checkpoint_weights(start_group):
    model_dir = tiny_model_dir("qwen3_norm_topk")
    options = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "redundant": REDUNDANT}
    group = start_group("eplb", 1, RANKS, options=options)
    codes = group.wait(timeout_s=200)
    assert codes == [0] * RANKS, [group.stderr(r)[-3000:] for r in range(RANKS)]
    results = group.results()
    with one_torch_thread():
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        reference = [r.token_ids for r in LLM(str(model_dir), max_model_len=128).generate(PROMPTS, greedy)]
    front = results[0]
    for tag, prefix in (("warmup", "w"), ("during", "s"), ("after", "a")):
        assert [front[tag][f"{prefix}{i}"] for i in range(len(PROMPTS))] == reference, tag

    rebalance = front["rebalance"]
    assert rebalance["moved_experts"] > 0 and rebalance["pause_seconds"] > 0
    assert 0 < rebalance["balancedness_before"] <= rebalance["predicted_balancedness"] <= 1
    state = front["state"]
    assert state["rebalances"] == 1 and 0 < state["balancedness"] <= 1
    assert state["placement"]["num_physical_experts"] == 12 and state["placement"]["slots_per_rank"] == 3

    tensors = checkpoint(model_dir)
    placements = {str(r["phy2log"]) for r in results}
    assert len(placements) == 1  # every rank installed the same placement
    phy2log = results[0]["phy2log"]
    start = [p % 8 for p in range(12)]
    assert any(layer != start for layer in phy2log)  # something really moved
    for layer_slots in phy2log:
        assert set(layer_slots) == set(range(8)) and len(layer_slots) == 12
    for rank, result in enumerate(results):
        for i, (before, after) in enumerate(zip(result["before"], result["after_slots"], strict=True)):
            assert before["local_experts"] == start[rank * 3 : (rank + 1) * 3]
            assert after["local_experts"] == phy2log[i][rank * 3 : (rank + 1) * 3]
            for slot, expert in enumerate(after["local_experts"]):
                w13, w2 = expected_slot(tensors, after["layer"], expert)
                assert torch.equal(after["w13"][slot], w13), (rank, i, slot, expert)
                assert torch.equal(after["w2"][slot], w2), (rank, i, slot, expert)
    # Hot experts got the spare slots: some expert has more than one replica in some layer.
    assert any(max(Counter(layer).values()) > 1 for layer in phy2log)
