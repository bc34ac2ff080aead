"""Model shapes for `moefleet bench`: full-width configs of real checkpoints, with a configurable depth.

Pure data: an HF-style config dict per preset (the same fields the checkpoints' config.json carry), so the
benchmark builds exactly the modules a real checkpoint would get, on random weights.
"""

from __future__ import annotations

import copy
from typing import Any

# DeepSeek-V3 / R1 (671B total, 37B active): MLA, 256 routed experts top-8 + 1 shared, grouped routing.
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
}

# Qwen3-30B-A3B: GQA (32 query / 4 KV heads, q/k norm), 128 experts top-8, no shared expert.
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
}

# A tiny shape for smoke tests on CPU (same code path, seconds per run).
TINY_DEEPSEEK: dict[str, Any] = {
    **DEEPSEEK_V3,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": DEEPSEEK_V3,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "tiny-deepseek": TINY_DEEPSEEK,
}


def num_experts(config: dict[str, Any]) -> int:
    return int(config.get("n_routed_experts") or config["num_experts"])


def preset_config(
    name: str, num_layers: int | None = None, dense_layers: int | None = None
) -> dict[str, Any]:
    """The preset's config with `num_layers` decoder layers, of which the first `dense_layers` are dense.

    With few layers the default keeps every layer MoE (dense_layers 0), since MoE layers dominate cost.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    config = copy.deepcopy(PRESETS[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers ({num_layers}) must be >= 1")
        config["num_hidden_layers"] = num_layers
    dense = 0 if dense_layers is None else dense_layers
    if not 0 <= dense <= config["num_hidden_layers"]:
        raise ValueError(f"dense_layers ({dense}) must be in [0, num_layers ({config['num_hidden_layers']})]")
    if "first_k_dense_replace" in config:
        config["first_k_dense_replace"] = dense
    else:
        config["mlp_only_layers"] = list(range(dense))
    return config
