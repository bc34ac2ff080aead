"""gpt-oss (`GptOssForCausalLM`) config parsed from HF config.json, with readable errors.

Every layer is MoE (softmax over the top-k of biased router logits; experts with biases and the clamped
SwiGLU `swiglu_alpha` / `swiglu_limit`). Attention has q/k/v/o bias, per-head sinks, and alternates
`sliding_attention` (window `sliding_window`) and `full_attention` layers (`layer_types`). RoPE defaults to
transformers' gpt-oss yarn (factor 32 over 4096 positions, truncate false) when the config names none.
Experts may ship as MXFP4 (`quantization_config.quant_method: mxfp4`), dequantized at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moefleet.engine.layers.rotary import RopeScaling, parse_rope_scaling
from moefleet.engine.models.configs import _check_act, _get, _with_aliases, check_attention_shape

LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclass
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    layer_types: list[str]
    sliding_window: int | None = 128
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    mxfp4: bool = False
    fp8_weight_block_size: tuple[int, int] | None = None  # gpt-oss has no block-FP8 release

    @classmethod
    def from_dict(cls, d: dict) -> GptOssConfig:
        arch = "GptOssForCausalLM"
        d = _with_aliases(d, {"num_experts": "num_local_experts"})
        _check_act(d, arch)
        hidden = _get(d, "hidden_size", arch, kind=int)
        heads = _get(d, "num_attention_heads", arch, kind=int)
        layers = _get(d, "num_hidden_layers", arch, kind=int)
        max_pos = _get(d, "max_position_embeddings", arch, 131072, int)
        rope_params: dict = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_source = d
        if not rope_params:
            rope_source = {**d, "rope_scaling": {**DEFAULT_ROPE, "rope_theta": d.get("rope_theta", 150000.0)}}
        elif not d.get("rope_theta") and "rope_theta" not in rope_params:
            rope_source = {**d, "rope_theta": 150000.0}
        theta, scaling = parse_rope_scaling(rope_source, max_pos)
        layer_types = _get(
            d,
            "layer_types",
            arch,
            ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
            list,
        )
        cfg = cls(
            vocab_size=_get(d, "vocab_size", arch, kind=int),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", arch, kind=int),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_get(d, "num_key_value_heads", arch, heads, int),
            head_dim=_get(d, "head_dim", arch, hidden // heads, int),
            num_local_experts=_get(d, "num_local_experts", arch, kind=int),
            num_experts_per_tok=_get(d, "num_experts_per_tok", arch, 4, int),
            layer_types=list(layer_types),
            sliding_window=_get(d, "sliding_window", arch, None, int),
            swiglu_alpha=float(_get(d, "swiglu_alpha", arch, 1.702, (int, float))),
            swiglu_limit=float(_get(d, "swiglu_limit", arch, 7.0, (int, float))),
            rms_norm_eps=float(_get(d, "rms_norm_eps", arch, 1e-5)),
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(_get(d, "attention_bias", arch, True)),
            tie_word_embeddings=bool(_get(d, "tie_word_embeddings", arch, False)),
            mxfp4=_is_mxfp4(d, arch),
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
            ),
        )
        if len(cfg.layer_types) != layers or any(t not in LAYER_TYPES for t in cfg.layer_types):
            raise ValueError(
                f"config.json layer_types must list one of {', '.join(LAYER_TYPES)} per layer "
                f"({layers} layers), got {cfg.layer_types!r}"
            )
        if "sliding_attention" in cfg.layer_types and (cfg.sliding_window is None or cfg.sliding_window < 1):
            raise ValueError(
                f"config.json sliding_window must be >= 1 when layer_types has sliding_attention, "
                f"got {cfg.sliding_window!r}"
            )
        return cfg

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def is_moe_layer(self, layer: int) -> bool:
        return True

    @property
    def num_routed_experts(self) -> int:
        return self.num_local_experts


def _is_mxfp4(d: dict, arch: str) -> bool:
    quant = d.get("quantization_config")
    if not quant:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "mxfp4":
        raise ValueError(
            f"config.json quantization_config (quant_method {method!r}) is not supported for {arch}: "
            "supported are unquantized checkpoints and the released MXFP4 experts (quant_method 'mxfp4')"
        )
    return True
