"""GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`) config parsed from HF config.json, with readable errors.

Same routing as DeepSeek-V3 (sigmoid, grouped top-k with `e_score_correction_bias`, `routed_scaling_factor`,
shared experts, `first_k_dense_replace` leading dense layers) on GQA attention with partial rotary
(`partial_rotary_factor`, default 0.5), optional per-head q/k RMSNorm (`use_qk_norm`) and q/k/v bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moefleet.engine.layers.rotary import RopeScaling, parse_rope_scaling
from moefleet.engine.models.configs import (
    _check_act,
    _fp8_block_size,
    _get,
    _with_aliases,
    check_attention_shape,
)


@dataclass
class Glm4MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    fp8_weight_block_size: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Glm4MoeConfig:
        arch = "Glm4MoeForCausalLM"
        d = _with_aliases(
            d, {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
        )
        _check_act(d, arch)
        hidden = _get(d, "hidden_size", arch, kind=int)
        heads = _get(d, "num_attention_heads", arch, kind=int)
        max_pos = _get(d, "max_position_embeddings", arch, 131072, int)
        theta, scaling = parse_rope_scaling(d, max_pos)
        rope_params = d.get("rope_parameters") or d.get("rope_scaling") or {}
        partial = rope_params.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        if not isinstance(partial, int | float) or not 0 < partial <= 1:
            raise ValueError(f"config.json field 'partial_rotary_factor' must be in (0, 1], got {partial!r}")
        cfg = cls(
            vocab_size=_get(d, "vocab_size", arch, kind=int),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", arch, kind=int),
            moe_intermediate_size=_get(d, "moe_intermediate_size", arch, kind=int),
            num_hidden_layers=_get(d, "num_hidden_layers", arch, kind=int),
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", arch, heads, int),
            head_dim=_get(d, "head_dim", arch, hidden // heads, int),
            n_routed_experts=_get(d, "n_routed_experts", arch, kind=int),
            num_experts_per_tok=_get(d, "num_experts_per_tok", arch, kind=int),
            n_shared_experts=_get(d, "n_shared_experts", arch, 1, int),
            routed_scaling_factor=float(_get(d, "routed_scaling_factor", arch, 1.0)),
            n_group=_get(d, "n_group", arch, 1, int),
            topk_group=_get(d, "topk_group", arch, 1, int),
            first_k_dense_replace=_get(d, "first_k_dense_replace", arch, 1, int),
            norm_topk_prob=bool(_get(d, "norm_topk_prob", arch, True)),
            use_qk_norm=bool(_get(d, "use_qk_norm", arch, False)),
            partial_rotary_factor=float(partial),
            rms_norm_eps=float(_get(d, "rms_norm_eps", arch, 1e-5)),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(_get(d, "attention_bias", arch, False)),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", arch, False)),
            fp8_weight_block_size=_fp8_block_size(d, arch),
        )
        check_attention_shape(
            cfg,
            (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "n_routed_experts",
            ),
        )
        if cfg.rotary_dim < 2 or cfg.rotary_dim % 2:
            raise ValueError(
                f"head_dim ({cfg.head_dim}) x partial_rotary_factor ({cfg.partial_rotary_factor}) must give an "
                f"even rotary dimension >= 2, got {cfg.rotary_dim}"
            )
        return cfg

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def num_routed_experts(self) -> int:
        return self.n_routed_experts
