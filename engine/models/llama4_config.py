"""Llama-4 text (`Llama4ForCausalLM` with a `llama4_text` config, or the `text_config` of a
`Llama4ForConditionalGeneration` checkpoint) config parsed from HF config.json, with readable errors.

Defaults are transformers' `Llama4TextConfig` defaults (e.g. head_dim 128, attention_chunk_size 8192,
no_rope_layers from no_rope_layer_interval 4, moe_layers from interleave_moe_layer_step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moefleet.engine.layers.rotary import RopeScaling, parse_rope_scaling
from moefleet.engine.models.configs import _check_act, _get, check_attention_shape

LAYER_TYPES = ("chunked_attention", "full_attention")


@dataclass
class Llama4TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    intermediate_size_mlp: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: list[int]
    no_rope_layers: list[int]
    layer_types: list[str]
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    fp8_weight_block_size: tuple[int, int] | None = (
        None  # the FP8 Maverick release is per-channel: unsupported
    )

    @classmethod
    def from_dict(cls, d: dict) -> Llama4TextConfig:
        arch = "Llama4ForCausalLM"
        if isinstance(d.get("text_config"), dict):  # Llama4ForConditionalGeneration: serve the text model
            d = {"tie_word_embeddings": d.get("tie_word_embeddings", False), **d["text_config"]}
        if d.get("quantization_config"):
            raise ValueError(
                "config.json quantization_config is not supported for Llama-4 (supported: unquantized "
                "bf16 checkpoints)"
            )
        _check_act(d, arch)
        layers = _get(d, "num_hidden_layers", arch, kind=int)
        heads = _get(d, "num_attention_heads", arch, kind=int)
        interval = _get(d, "no_rope_layer_interval", arch, 4, int)
        no_rope_layers = list(
            _get(d, "no_rope_layers", arch, [int((i + 1) % interval != 0) for i in range(layers)], list)
        ) or [int((i + 1) % interval != 0) for i in range(layers)]
        step = _get(d, "interleave_moe_layer_step", arch, 1, int)
        moe_layers = list(_get(d, "moe_layers", arch, list(range(step - 1, layers, step)), list))
        chunk = d["attention_chunk_size"] if "attention_chunk_size" in d else 8192
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"config.json field 'attention_chunk_size' must be >= 1 or null, got {chunk!r}")
        default_types = [
            "chunked_attention" if rope and chunk is not None else "full_attention" for rope in no_rope_layers
        ]
        max_pos = _get(d, "max_position_embeddings", arch, 131072, int)
        rope_source = (
            d if (d.get("rope_theta") or d.get("rope_parameters")) else {**d, "rope_theta": 500000.0}
        )
        theta, scaling = parse_rope_scaling(rope_source, max_pos)
        cfg = cls(
            vocab_size=_get(d, "vocab_size", arch, kind=int),
            hidden_size=_get(d, "hidden_size", arch, kind=int),
            intermediate_size=_get(d, "intermediate_size", arch, kind=int),
            intermediate_size_mlp=_get(d, "intermediate_size_mlp", arch, kind=int),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", arch, heads, int),
            head_dim=_get(d, "head_dim", arch, 128, int),
            num_local_experts=_get(d, "num_local_experts", arch, kind=int),
            num_experts_per_tok=_get(d, "num_experts_per_tok", arch, 1, int),
            moe_layers=moe_layers,
            no_rope_layers=no_rope_layers,
            layer_types=list(_get(d, "layer_types", arch, default_types, list)),
            attention_chunk_size=chunk,
            use_qk_norm=bool(_get(d, "use_qk_norm", arch, True)),
            attn_temperature_tuning=bool(_get(d, "attn_temperature_tuning", arch, True)),
            floor_scale=_get(d, "floor_scale", arch, 8192, int),
            attn_scale=float(_get(d, "attn_scale", arch, 0.1, (int, float))),
            rms_norm_eps=float(_get(d, "rms_norm_eps", arch, 1e-5)),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(_get(d, "attention_bias", arch, False)),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", arch, False)),
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
                "num_local_experts",
                "floor_scale",
            ),
        )
        if len(cfg.no_rope_layers) != layers or any(v not in (0, 1) for v in cfg.no_rope_layers):
            raise ValueError(
                f"config.json no_rope_layers must give 1 (RoPE) or 0 (NoPE) per layer ({layers} layers), "
                f"got {cfg.no_rope_layers!r}"
            )
        if len(cfg.layer_types) != layers or any(t not in LAYER_TYPES for t in cfg.layer_types):
            raise ValueError(
                f"config.json layer_types must list one of {', '.join(LAYER_TYPES)} per layer "
                f"({layers} layers), got {cfg.layer_types!r}"
            )
        if "chunked_attention" in cfg.layer_types and chunk is None:
            raise ValueError("config.json layer_types has chunked_attention but attention_chunk_size is null")
        if any(not 0 <= i < layers for i in cfg.moe_layers):
            raise ValueError(f"config.json moe_layers {cfg.moe_layers!r} must be layer indices < {layers}")
        return cfg

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def layer_chunk(self, layer: int) -> int | None:
        return self.attention_chunk_size if self.layer_types[layer] == "chunked_attention" else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def num_routed_experts(self) -> int:
        return self.num_local_experts
