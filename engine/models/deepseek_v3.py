"""DeepSeek-V3 / R1 and Kimi-K2 (same class): MLA attention, sigmoid grouped top-k MoE with shared experts.

Layer i is sparse when i >= first_k_dense_replace and i % moe_layer_freq == 0. Multi-token-prediction
layers (index >= num_hidden_layers) in the checkpoint are skipped.
Shape legend: T tokens, D hidden.
"""

from __future__ import annotations

from moefleet.engine.layers.mla import MLAConfig, MLAttention
from moefleet.engine.layers.rotary import RotaryEmbedding, mla_softmax_scale
from moefleet.engine.models.base import CausalLM, DecoderLayer
from moefleet.engine.models.configs import DeepseekV3Config
from moefleet.engine.models.grouped_moe import feed_forward


def decoder_layer(config: DeepseekV3Config, layer: int, rotary: RotaryEmbedding) -> DecoderLayer:
    c = config
    mla = MLAConfig(
        hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        softmax_scale=mla_softmax_scale(c.qk_nope_head_dim + c.qk_rope_head_dim, c.rope_scaling),
        attention_bias=c.attention_bias,
        rms_norm_eps=c.rms_norm_eps,
    )
    mlp = feed_forward(c, layer, scoring=c.scoring_func, correction_bias=c.scoring_func == "sigmoid")
    return DecoderLayer(MLAttention(mla, rotary), mlp, c.hidden_size, c.rms_norm_eps)


class DeepseekV3ForCausalLM(CausalLM):
    config_class = DeepseekV3Config

    def __init__(self, config: DeepseekV3Config):
        c = config
        rotary = RotaryEmbedding(
            c.qk_rope_head_dim, c.rope_theta, c.rope_scaling, interleaved=c.rope_interleave
        )
        super().__init__(c, [decoder_layer(c, i, rotary) for i in range(c.num_hidden_layers)])
