"""Useful FLOPs of a forward step, counted per architecture from the config (for prefill MFU). Pure.

Counted (2 FLOPs per multiply-add), per layer and token unless said otherwise:
- DeepSeek-V3 / Kimi-K2 (MLA): q (q_a D*Rq + q_b Rq*H*(Dn+Dr), or q_proj D*H*(Dn+Dr)), kv_a D*(R+Dr),
  kv_b R*H*(Dn+Dv) once per context row (prefill expands every row; a fresh prompt has one per token),
  o H*Dv*D; attention H*(Dn+Dr) for QK^T plus H*Dv for PV per visible (query, key) pair.
- Qwen3-MoE (GQA): q D*H*Dh, k and v D*Hk*Dh each, o H*Dh*D; attention 2*H*Dh per visible pair.
- MoE layers: router D*E, routed experts top_k*3*D*I (gate, up, down), shared experts n_shared*3*D*I;
  dense layers 3*D*I_dense. LM head D*V per sampled row. Norms, rope, softmax and top-k are not counted.
Visible pairs are causal: a sequence with c cached tokens computing q new ones has q*c + q*(q+1)/2.
Expert parallelism does not change the per-rank count: each rank computes its own tokens' share on average.
"""

from __future__ import annotations

from typing import Any


def _moe_layers(config: dict[str, Any], num_layers: int) -> list[bool]:
    if "kv_lora_rank" in config:  # DeepSeek-V3 family
        first, freq = int(config.get("first_k_dense_replace", 0)), int(config.get("moe_layer_freq", 1))
        return [i >= first and i % freq == 0 for i in range(num_layers)]
    step = int(config.get("decoder_sparse_step", 1))
    skip = set(config.get("mlp_only_layers") or [])
    experts = int(config.get("num_experts", 0))
    return [i not in skip and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


def _attention_macs(config: dict[str, Any]) -> tuple[int, int, int]:
    """(MACs per new token, MACs per context row, MACs per visible (query, key) pair) of one layer."""
    d, h = int(config["hidden_size"]), int(config["num_attention_heads"])
    if "kv_lora_rank" in config:
        r, rq = int(config["kv_lora_rank"]), config.get("q_lora_rank")
        dn, dr, dv = (int(config[k]) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        q = d * int(rq) + int(rq) * h * (dn + dr) if rq else d * h * (dn + dr)
        per_token = q + d * (r + dr) + h * dv * d
        return per_token, r * h * (dn + dv), h * (dn + dr + dv)
    hk = int(config["num_key_value_heads"])
    dh = int(config.get("head_dim") or d // h)
    return d * h * dh + 2 * d * hk * dh + h * dh * d, 0, 2 * h * dh


def _mlp_macs(config: dict[str, Any], moe: bool) -> int:
    d = int(config["hidden_size"])
    if not moe:
        return 3 * d * int(config["intermediate_size"])
    inter = int(config["moe_intermediate_size"])
    experts = int(config.get("n_routed_experts") or config.get("num_experts") or 0)
    top_k = int(config["num_experts_per_tok"])
    shared = int(config.get("n_shared_experts") or 0)
    return d * experts + top_k * 3 * d * inter + shared * 3 * d * inter


def forward_flops(
    config: dict[str, Any], query_lens: list[int], seq_lens: list[int], num_sampled: int
) -> int:
    """FLOPs of one step computing query_lens[b] new tokens of sequences of seq_lens[b] (cached + new)."""
    num_layers = int(config["num_hidden_layers"])
    tokens = sum(query_lens)
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens, strict=True))
    # Context rows expanded through kv_b (MLA prefill): every row of each sequence that extends.
    expanded_rows = sum(s for q, s in zip(query_lens, seq_lens, strict=True) if q > 1)
    per_token, per_row, per_pair = _attention_macs(config)
    macs = 0
    for moe in _moe_layers(config, num_layers):
        macs += tokens * (per_token + _mlp_macs(config, moe)) + expanded_rows * per_row + pairs * per_pair
    macs += num_sampled * int(config["hidden_size"]) * int(config["vocab_size"])
    return 2 * macs


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None
