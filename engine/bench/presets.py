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

# GLM-4.5 (355B total, 32B active): GQA (96 query / 8 KV heads, q/k norm, half-rotary), 160 experts top-8 +
# 1 shared, sigmoid routing with correction bias, 3 leading dense layers (MTP layer not built).
GLM_4_5: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "vocab_size": 151552,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 92,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "use_qk_norm": True,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
}

# gpt-oss-120B (117B total, 5.1B active): GQA (64 query / 8 KV heads, head 64) with sinks, sliding window
# 128 on every other layer, 128 experts top-4 with biases. Built unquantized (bf16), not MXFP4.
GPT_OSS_120B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 36,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "attention_bias": True,
    "swiglu_limit": 7.0,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 150000,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    "tie_word_embeddings": False,
}

# Llama-4-Maverick text (400B total, 17B active): GQA (40 query / 8 KV heads), chunked attention (8192) with
# a global NoPE layer every 4th, 128 experts top-1 + 1 shared on every other layer (dense between).
LLAMA4_MAVERICK: dict[str, Any] = {
    "architectures": ["Llama4ForCausalLM"],
    "model_type": "llama4_text",
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_local_experts": 128,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "attention_chunk_size": 8192,
    "use_qk_norm": False,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "hidden_act": "silu",
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
}

_TINY_WIDTH: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
}
TINY_GLM4 = {
    **GLM_4_5,
    **_TINY_WIDTH,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
}
TINY_GPT_OSS = {
    **GPT_OSS_120B,
    **_TINY_WIDTH,
    "intermediate_size": 32,
    "num_local_experts": 8,
    "sliding_window": 16,
}
TINY_LLAMA4 = {
    **LLAMA4_MAVERICK,
    **_TINY_WIDTH,
    "intermediate_size": 32,
    "intermediate_size_mlp": 128,
    "num_local_experts": 8,
    "attention_chunk_size": 16,
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": DEEPSEEK_V3,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "glm-4.5": GLM_4_5,
    "gpt-oss-120b": GPT_OSS_120B,
    "llama4-maverick": LLAMA4_MAVERICK,
    "tiny-deepseek": TINY_DEEPSEEK,
    "tiny-glm4": TINY_GLM4,
    "tiny-gpt-oss": TINY_GPT_OSS,
    "tiny-llama4": TINY_LLAMA4,
}


def num_experts(config: dict[str, Any]) -> int:
    return int(config.get("n_routed_experts") or config.get("num_local_experts") or config["num_experts"])


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
    layers = config["num_hidden_layers"]
    if "first_k_dense_replace" in config:
        config["first_k_dense_replace"] = dense
    elif config["model_type"] == "gpt_oss":
        if dense:
            raise ValueError("gpt-oss has no dense layers: leave dense_layers at 0")
        config["layer_types"] = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)
        ]
    elif config["model_type"] == "llama4_text":
        config["moe_layers"] = list(range(dense, layers))  # Maverick interleaves; depth-limited runs keep MoE
    else:
        config["mlp_only_layers"] = list(range(dense))
    return config
