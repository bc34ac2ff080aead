"""Weight bytes per GPU from a model config and a deployment (pure functions; printed at start-up).

With DP attention + EP MoE every rank holds the full non-expert model (embedding, attention, dense MLPs,
shared experts, router, lm_head) and `ceil((E + redundant) / ep)` routed-expert slots per MoE layer.
Quantisation "fp8" (DeepSeek's block format, what `--quantization` keeps): linear and expert weights are
1 byte plus one float32 scale per 128x128 tile; kv_b_proj stays in the model dtype (absorbed MLA), and so do
embeddings, lm_head and norms; router gates are float32 for sigmoid (DeepSeek) routing, as in the model.
The example deployments are those in manifests/ (tests check the table against the YAML files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
FP8_BLOCK = (128, 128)


@dataclass(frozen=True)
class WeightBytes:
    embedding: int  # input embedding + lm_head
    dense: int  # attention, dense MLPs, shared experts, norms, routers (every rank)
    routed_per_rank: int  # this rank's routed-expert slots, all MoE layers
    expert_slots: int  # routed experts per MoE layer on one rank

    @property
    def total(self) -> int:
        return self.embedding + self.dense + self.routed_per_rank


def _linear(out_f: int, in_f: int, quantization: str, dtype_bytes: int) -> int:
    if quantization == "fp8":
        return out_f * in_f + math.ceil(out_f / FP8_BLOCK[0]) * math.ceil(in_f / FP8_BLOCK[1]) * 4
    return out_f * in_f * dtype_bytes


def _is_deepseek(config: dict[str, Any]) -> bool:
    return "kv_lora_rank" in config


def num_routed_experts(config: dict[str, Any]) -> int:
    return int(config.get("n_routed_experts") or config["num_experts"])


def _moe_layers(config: dict[str, Any]) -> int:
    layers = int(config["num_hidden_layers"])
    if _is_deepseek(config):
        first_dense = int(config.get("first_k_dense_replace", 0))
        freq = int(config.get("moe_layer_freq", 1))
        return sum(1 for i in range(first_dense, layers) if i % freq == 0)
    sparse_step = int(config.get("decoder_sparse_step", 1))
    mlp_only = set(config.get("mlp_only_layers") or [])
    return sum(1 for i in range(layers) if i not in mlp_only and (i + 1) % sparse_step == 0)


def weight_bytes(
    config: dict[str, Any],
    ep_size: int = 1,
    redundant_experts: int = 0,
    quantization: str = "none",
    dtype_bytes: int = 2,
) -> WeightBytes:
    """Bytes of weights one rank holds (see the module docstring)."""
    if quantization not in ("none", "fp8"):
        raise ValueError(f"quantization {quantization!r} must be 'none' or 'fp8'")
    d = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    layers = int(config["num_hidden_layers"])
    moe_layers = _moe_layers(config)
    dense_layers = layers - moe_layers
    experts = num_routed_experts(config)
    moe_inter = int(config["moe_intermediate_size"])
    q, b = quantization, dtype_bytes

    def lin(o: int, i: int) -> int:
        return _linear(o, i, q, b)

    embedding = vocab * d * b * (1 if config.get("tie_word_embeddings") else 2)
    if _is_deepseek(config):
        heads = int(config["num_attention_heads"])
        nope, rope, v = (int(config[k]) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        q_rank, kv_rank = config.get("q_lora_rank"), int(config["kv_lora_rank"])
        if q_rank:
            attn = lin(int(q_rank), d) + int(q_rank) * b + lin(heads * (nope + rope), int(q_rank))
        else:
            attn = lin(heads * (nope + rope), d)
        attn += lin(kv_rank + rope, d) + kv_rank * b
        attn += kv_rank * heads * (nope + v) * b  # kv_b_proj: never FP8
        attn += lin(d, heads * v)
        shared = int(config.get("n_shared_experts") or 0) * moe_inter
        router = experts * d * 4 + experts * 4  # float32 gate + e_score_correction_bias
    else:
        heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
        head_dim = int(config.get("head_dim") or d // heads)
        attn = lin(heads * head_dim, d) + 2 * lin(kv_heads * head_dim, d) + lin(d, heads * head_dim)
        attn += 2 * head_dim * b  # q_norm, k_norm
        shared = 0
        router = experts * d * b
    mlp = 3 * lin(int(config["intermediate_size"]), d)
    moe_dense = (3 * lin(shared, d) if shared else 0) + router
    dense = layers * (attn + 2 * d * b) + dense_layers * mlp + moe_layers * moe_dense + d * b
    slots = math.ceil((experts + redundant_experts) / ep_size)
    expert = 2 * lin(moe_inter, d) + lin(d, moe_inter)
    return WeightBytes(embedding, dense, moe_layers * slots * expert, slots)


# (deployment, manifest, role, preset, routed experts, EP size, redundant experts)
EXAMPLE_DEPLOYMENTS: list[tuple[str, str, str, str, int, int, int]] = [
    ("DeepSeek-R1 reference", "deepseek-r1-reference.yaml", "prefill", "deepseek-v3", 256, 32, 32),
    ("DeepSeek-R1 reference", "deepseek-r1-reference.yaml", "decode", "deepseek-v3", 256, 72, 32),
    ("Kimi-K2 on H200", "kimi-k2-h200.yaml", "prefill", "kimi-k2", 384, 32, 96),
    ("Kimi-K2 on H200", "kimi-k2-h200.yaml", "decode", "kimi-k2", 384, 96, 96),
    ("Qwen3-30B-A3B small", "qwen3-moe-small.yaml", "serve", "qwen3-30b-a3b", 128, 4, 0),
]


def kimi_k2_config() -> dict[str, Any]:
    """Kimi-K2-Instruct's config.json fields that size weights: DeepSeek-V3 layout, 384 experts, 64 heads."""
    from moefleet.engine.bench.presets import DEEPSEEK_V3

    return {
        **DEEPSEEK_V3,
        "vocab_size": 163840,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "n_routed_experts": 384,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
    }


def example_table(quantizations: tuple[str, ...] = ("fp8", "none")) -> str:
    """Markdown table: weight GiB per GPU of each example deployment."""
    from moefleet.engine.bench.presets import PRESETS

    configs = {**PRESETS, "kimi-k2": kimi_k2_config()}
    lines = [
        "| deployment | role | EP | expert slots/GPU | "
        + " | ".join(f"weights/GPU {q}" for q in quantizations)
        + " |",
        "|---|---|---|---|" + "---|" * len(quantizations),
    ]
    for name, _, role, preset, _, ep, redundant in EXAMPLE_DEPLOYMENTS:
        plans = [weight_bytes(configs[preset], ep, redundant, q) for q in quantizations]
        cells = " | ".join(f"{p.total / GiB:.1f} GiB" for p in plans)
        lines.append(f"| {name} | {role} | {ep} | {plans[0].expert_slots} | {cells} |")
    return "\n".join(lines)


def startup_line(config: dict[str, Any], ep_size: int, quantization: str, dtype_bytes: int) -> str:
    """One line for the server log: this deployment's weight bytes per GPU."""
    plan = weight_bytes(config, ep_size, 0, quantization, dtype_bytes)
    return (
        f"weights per GPU ({quantization}, EP{ep_size}, {plan.expert_slots} expert slots/layer): "
        f"{plan.total / GiB:.2f} GiB = embeddings {plan.embedding / GiB:.2f} + dense {plan.dense / GiB:.2f} "
        f"+ routed experts {plan.routed_per_rank / GiB:.2f}"
    )
