"""Typed model configs parsed from HF config.json, one per architecture, validated with readable errors.

No transformers dependency: fields are read from the dict with the same names and defaults HF uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moefleet.engine.layers.rotary import RopeScaling, parse_rope_scaling

_MISSING = object()


def _get(
    d: dict, key: str, arch: str, default: Any = _MISSING, kind: type | tuple[type, ...] | None = None
) -> Any:
    if d.get(key) is None:
        if default is _MISSING:
            raise ValueError(f"config.json for {arch} is missing the required field {key!r}")
        return default
    value = d[key]
    if kind is not None and value is not None and not isinstance(value, kind):
        raise ValueError(f"config.json field {key!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _with_aliases(d: dict, aliases: dict[str, str]) -> dict:
    """Fill canonical keys from alias keys (transformers>=5 writes e.g. `num_local_experts`)."""
    out = dict(d)
    for alias, key in aliases.items():
        if out.get(key) is None and out.get(alias) is not None:
            out[key] = out[alias]
    return out


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"config.json field {name!r} must be >= 1, got {value}")


def check_attention_shape(cfg: Any, positive_fields: tuple[str, ...]) -> None:
    """Shared GQA config checks: the named fields are >= 1 and query heads divide evenly over KV heads."""
    for name in positive_fields:
        _positive(name, getattr(cfg, name))
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({cfg.num_attention_heads}) is not divisible by "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )


def _fp8_block_size(d: dict, arch: str) -> tuple[int, int] | None:
    """`weight_block_size` of a block-FP8 checkpoint (dequantized at load), None when unquantized."""
    quant = d.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if method != "fp8" or not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(
            f"config.json quantization_config (quant_method {method!r}, weight_block_size {block!r}) is not "
            f"supported for {arch}: supported are unquantized checkpoints and block FP8 "
            "(quant_method 'fp8' with weight_block_size [rows, cols])"
        )
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"config.json quantization_config.fmt {quant.get('fmt')!r} is not supported (supported: e4m3)"
        )
    return (block[0], block[1])


def _check_act(d: dict, arch: str) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act {act!r} is not supported for {arch} (supported: silu)")


@dataclass
class Qwen3MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    fp8_weight_block_size: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Qwen3MoeConfig:
        arch = "Qwen3MoeForCausalLM"
        d = _with_aliases(d, {"num_local_experts": "num_experts"})
        _check_act(d, arch)
        if d.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=true is not supported for Qwen3MoeForCausalLM")
        hidden = _get(d, "hidden_size", arch, kind=int)
        heads = _get(d, "num_attention_heads", arch, kind=int)
        max_pos = _get(d, "max_position_embeddings", arch, 32768, int)
        theta, scaling = parse_rope_scaling(d, max_pos)
        cfg = cls(
            vocab_size=_get(d, "vocab_size", arch, kind=int),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", arch, kind=int),
            num_hidden_layers=_get(d, "num_hidden_layers", arch, kind=int),
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", arch, heads, int),
            head_dim=_get(d, "head_dim", arch, hidden // heads, int),
            moe_intermediate_size=_get(d, "moe_intermediate_size", arch, kind=int),
            num_experts=_get(d, "num_experts", arch, kind=int),
            num_experts_per_tok=_get(d, "num_experts_per_tok", arch, kind=int),
            norm_topk_prob=bool(_get(d, "norm_topk_prob", arch, False)),
            decoder_sparse_step=_get(d, "decoder_sparse_step", arch, 1, int),
            mlp_only_layers=list(_get(d, "mlp_only_layers", arch, [], list)),
            rms_norm_eps=float(_get(d, "rms_norm_eps", arch, 1e-6)),
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
                "decoder_sparse_step",
            ),
        )
        return cfg

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts


@dataclass
class DeepseekV3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    fp8_weight_block_size: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> DeepseekV3Config:
        arch = "DeepseekV3ForCausalLM"
        d = _with_aliases(
            d, {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
        )
        _check_act(d, arch)
        topk_method = d.get("topk_method", "noaux_tc")
        if topk_method not in ("noaux_tc", None):
            raise ValueError(
                f"config.json topk_method {topk_method!r} is not supported (supported: noaux_tc)"
            )
        max_pos = _get(d, "max_position_embeddings", arch, 4096, int)
        theta, scaling = parse_rope_scaling(d, max_pos)
        cfg = cls(
            vocab_size=_get(d, "vocab_size", arch, kind=int),
            hidden_size=_get(d, "hidden_size", arch, kind=int),
            intermediate_size=_get(d, "intermediate_size", arch, kind=int),
            moe_intermediate_size=_get(d, "moe_intermediate_size", arch, kind=int),
            num_hidden_layers=_get(d, "num_hidden_layers", arch, kind=int),
            num_attention_heads=_get(d, "num_attention_heads", arch, kind=int),
            n_routed_experts=_get(d, "n_routed_experts", arch, kind=int),
            num_experts_per_tok=_get(d, "num_experts_per_tok", arch, kind=int),
            kv_lora_rank=_get(d, "kv_lora_rank", arch, kind=int),
            q_lora_rank=d.get("q_lora_rank"),
            qk_nope_head_dim=_get(d, "qk_nope_head_dim", arch, kind=int),
            qk_rope_head_dim=_get(d, "qk_rope_head_dim", arch, kind=int),
            v_head_dim=_get(d, "v_head_dim", arch, kind=int),
            n_shared_experts=_get(d, "n_shared_experts", arch, 0, int) or 0,
            routed_scaling_factor=float(_get(d, "routed_scaling_factor", arch, 1.0)),
            n_group=_get(d, "n_group", arch, 1, int) or 1,
            topk_group=_get(d, "topk_group", arch, 1, int) or 1,
            first_k_dense_replace=_get(d, "first_k_dense_replace", arch, 0, int) or 0,
            moe_layer_freq=_get(d, "moe_layer_freq", arch, 1, int) or 1,
            norm_topk_prob=bool(_get(d, "norm_topk_prob", arch, True)),
            scoring_func=_get(d, "scoring_func", arch, "sigmoid", str),
            rms_norm_eps=float(_get(d, "rms_norm_eps", arch, 1e-6)),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            rope_interleave=bool(_get(d, "rope_interleave", arch, True)),
            attention_bias=bool(_get(d, "attention_bias", arch, False)),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", arch, False)),
            fp8_weight_block_size=_fp8_block_size(d, arch),
        )
        if cfg.q_lora_rank is not None and (not isinstance(cfg.q_lora_rank, int) or cfg.q_lora_rank < 1):
            raise ValueError(
                f"config.json field 'q_lora_rank' must be a positive integer or null, got {cfg.q_lora_rank!r}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "moe_layer_freq",
        ):
            _positive(name, getattr(cfg, name))
        if cfg.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({cfg.qk_rope_head_dim}) must be even")
        return cfg

    def is_moe_layer(self, layer: int) -> bool:
        # As DeepSeek's reference code; transformers ignores moe_layer_freq (all released checkpoints use 1).
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def num_routed_experts(self) -> int:
        return self.n_routed_experts
