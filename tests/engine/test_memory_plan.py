"""memory_plan.weight_bytes against an independent count: the parameter bytes of the model the engine
actually builds (on the meta device, full width), in bf16 and with the FP8 plan applied; and the example
table against manifests/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from moefleet.engine import memory_plan
from moefleet.engine.bench.presets import PRESETS, preset_config
from moefleet.engine.fp8_weights import apply_plan, plan_fp8
from moefleet.engine.layers.experts import Experts
from moefleet.engine.loader import build_model

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def built_bytes(config: dict, quantization: str) -> tuple[int, int, int]:
    """(embedding + lm_head, everything else except routed experts, routed experts) of the real modules."""
    model = build_model(config, "meta", torch.bfloat16)
    if quantization == "fp8":
        with torch.device("meta"):
            apply_plan(model, plan_fp8(model, [], {}))
    embed = routed = other = 0
    for name, module in model.named_modules():
        tensors = list(
            module.parameters(recurse=False)
        )  # buffers (rotary tables, expert maps) are no weights
        if isinstance(module, Experts):
            tensors = [
                t for t in (module.w13, module.w2, module.w13_scale_inv, module.w2_scale_inv) if t is not None
            ]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if isinstance(module, Experts):
            routed += size
        elif name.endswith(("embed_tokens", "lm_head")):
            embed += size
        else:
            other += size
    return embed, other, routed


@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3-30b-a3b"])
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_weight_bytes_equal_the_built_model(preset, quantization):
    config = preset_config(preset, num_layers=3, dense_layers=1)
    plan = memory_plan.weight_bytes(config, ep_size=1, quantization=quantization)
    embed, other, routed = built_bytes(config, quantization)
    assert (plan.embedding, plan.dense, plan.routed_per_rank) == (embed, other, routed)


def test_expert_slots_per_rank_and_hand_computed_deepseek_expert():
    config = PRESETS["deepseek-v3"]  # 61 layers, the first 3 dense
    one_gpu = memory_plan.weight_bytes(config, 1)
    ep72 = memory_plan.weight_bytes(config, 72, redundant_experts=32)
    assert ep72.expert_slots == 4  # (256 + 32) / 72
    # 58 MoE layers x 4 slots x 3 x 7168 x 2048 x 2 bytes
    assert ep72.routed_per_rank == 58 * 4 * 3 * 7168 * 2048 * 2
    assert ep72.dense == one_gpu.dense and ep72.embedding == one_gpu.embedding
    fp8 = memory_plan.weight_bytes(config, 72, 32, "fp8")
    # 1 byte per weight + a float32 per 128x128 tile: (16 x 56 x 2 + 56 x 16) tiles per expert
    assert fp8.routed_per_rank == 58 * 4 * (3 * 7168 * 2048 + (16 * 56 * 2 + 56 * 16) * 4)


def test_example_deployments_match_manifests():
    for _, manifest, role, _, experts, ep, redundant in memory_plan.EXAMPLE_DEPLOYMENTS:
        spec = yaml.safe_load((MANIFESTS / manifest).read_text())["spec"]
        assert spec["model"]["numExperts"] == experts
        roles = spec["roles"]
        r = roles[role] if role in roles else next(iter(roles.values()))
        assert r["nodesPerReplica"] * r["gpusPerNode"] == ep, (manifest, role)
        assert (spec.get("eplb") or {}).get("redundantExperts", 0) == redundant
    table = memory_plan.example_table()
    assert "| DeepSeek-R1 reference | decode | 72 | 4 |" in table


def test_serve_prints_the_weight_plan_at_start_up(capsys, tmp_path):
    import argparse
    import json

    from moefleet.engine.entrypoints import serve_command
    from support.tiny_models import tiny_model_dir

    parser = argparse.ArgumentParser()
    serve_command.add_parser(parser.add_subparsers())
    model = tiny_model_dir("deepseek_grouped")
    serve_command.print_weight_plan(parser.parse_args(["serve", "--model", str(model)]), 2)
    out = capsys.readouterr().out
    plan = memory_plan.weight_bytes(json.loads((model / "config.json").read_text()), 2, 0, "none", 4)  # fp32
    line = (
        f"weights per GPU (none, EP2, {plan.expert_slots} expert slots/layer): {plan.total / 2**30:.2f} GiB"
    )
    assert line in out
    # a config the plan cannot size prints nothing (loading the model reports the real problem)
    (tmp_path / "config.json").write_text('{"architectures": ["Unknown"]}')
    serve_command.print_weight_plan(parser.parse_args(["serve", "--model", str(tmp_path)]), 1)
    assert capsys.readouterr().out == ""
