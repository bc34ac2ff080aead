"""Published configs parse and build (on the meta device) to the published parameter counts."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import topology
from moefleet.engine.bench import presets
from moefleet.engine.loader import build_model
from moefleet.engine.models.configs import DeepseekV3Config, Qwen3MoeConfig
from moefleet.engine.topology import Topology

# The published DeepSeek-V3 config.json (the bench preset carries the same fields) plus its MTP layer count.
DEEPSEEK_V3 = {**presets.DEEPSEEK_V3, "num_nextn_predict_layers": 1}
KIMI_K2 = {
    **DEEPSEEK_V3,
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.827,
    "rope_theta": 50000.0,
    "rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0},
    "num_nextn_predict_layers": 0,
}
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 1536,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-06,
}


def param_count(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e9


def activated_count(model) -> float:
    """Parameters one token touches: all but the routed experts it is not sent to."""
    idle = 0
    for module in model.modules():
        if hasattr(module, "gate") and hasattr(module, "experts"):
            num_experts, top_k = module.gate.config.num_experts, module.gate.config.top_k
            per_expert = (module.experts.w13.numel() + module.experts.w2.numel()) // num_experts
            idle += (num_experts - top_k) * per_expert
    return param_count(model) - idle / 1e9


# Published totals / activated parameters (model cards): DeepSeek-V3 671B / 37B (without the 14B MTP
# module), Kimi-K2 1T / 32B, Qwen3-235B-A22B 235B / 22B.
@pytest.mark.parametrize(
    ("config", "total", "activated"),
    [(DEEPSEEK_V3, 671.0, 37.0), (KIMI_K2, 1000.0, 32.0), (QWEN3_235B, 235.0, 22.0)],
)
def test_published_sizes_on_meta_device(config, total, activated):
    model = build_model(config, "meta", torch.bfloat16)
    assert param_count(model) == pytest.approx(total, rel=0.03)
    assert activated_count(model) == pytest.approx(activated, rel=0.05)


def test_expert_parallel_rank_allocates_its_share():
    topology.set_current(Topology.for_rank(3, 32))
    try:
        model = build_model(DEEPSEEK_V3, "meta", torch.bfloat16)
    finally:
        topology.set_current(Topology())
    experts = model.get_submodule("model.layers.3.mlp.experts")
    assert experts.local_experts == list(range(24, 32)) and experts.w13.shape == (8, 4096, 7168)
    assert param_count(model) < 60  # 671B total; 8 of 256 routed experts per layer here


def test_deepseek_fp8_config_is_accepted():
    quant = {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    config = DeepseekV3Config.from_dict({**DEEPSEEK_V3, "quantization_config": quant})
    assert config.fp8_weight_block_size == (128, 128)


def test_layer_kinds():
    ds = DeepseekV3Config.from_dict({**DEEPSEEK_V3, "moe_layer_freq": 2})
    assert [ds.is_moe_layer(i) for i in range(6)] == [False, False, False, False, True, False]
    qw = Qwen3MoeConfig.from_dict({**QWEN3_235B, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert [qw.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq'.*block FP8"),
        ({"quantization_config": {"quant_method": "fp8"}}, "weight_block_size None"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"topk_method": "greedy"}, "topk_method 'greedy'"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"n_routed_experts": "many"}, "'n_routed_experts' must be int"),
        ({"n_group": 3}, "not divisible by n_group"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        build_model({**DEEPSEEK_V3, **change}, "meta", torch.bfloat16)
