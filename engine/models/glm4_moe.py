"""GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`): GQA with partial rotary, DeepSeek-style sigmoid MoE.

Attention: q/k/v projections (bias iff `attention_bias`; o_proj never has one), optional per-head q/k
RMSNorm (`use_qk_norm`), rotary (rotate-halves layout) on the first `head_dim * partial_rotary_factor`
dims of each head only. Layers i >= `first_k_dense_replace` are MoE: sigmoid scores, grouped top-k on
scores + `e_score_correction_bias`, weights renormalised iff `norm_topk_prob` then times
`routed_scaling_factor`, plus `n_shared_experts` shared experts. Multi-token-prediction layers
(index >= num_hidden_layers) in the checkpoint are skipped.
Shape legend: T tokens, H heads, Hk KV heads, Dh head dim, R rotary dims.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from moefleet.engine.layers.attention import PagedAttention
from moefleet.engine.layers.linear import Linear
from moefleet.engine.layers.norm import RMSNorm
from moefleet.engine.layers.rotary import RotaryEmbedding
from moefleet.engine.models.base import CausalLM, DecoderLayer
from moefleet.engine.models.glm4_moe_config import Glm4MoeConfig
from moefleet.engine.models.grouped_moe import feed_forward
from torch import nn

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch


def partial_rotary(
    rotary: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first R = rotary.rotary_dim dims of q [T, H, Dh] and k [T, Hk, Dh]; the rest pass through."""
    dim = rotary.rotary_dim
    if dim == q.shape[-1]:
        return rotary(positions, q, k)
    q_rot, k_rot = rotary(positions, q[..., :dim], k[..., :dim])
    return torch.cat([q_rot, q[..., dim:]], dim=-1), torch.cat([k_rot, k[..., dim:]], dim=-1)


class Glm4MoeAttention(nn.Module):
    def __init__(self, config: Glm4MoeConfig, rotary: RotaryEmbedding):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.use_qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.use_qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = partial_rotary(self.rotary, positions, q, k)
        out = self.attn(q, k, v, batch)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


def decoder_layer(config: Glm4MoeConfig, layer: int, rotary: RotaryEmbedding) -> DecoderLayer:
    c = config
    mlp = feed_forward(c, layer, scoring="sigmoid", correction_bias=True)
    return DecoderLayer(Glm4MoeAttention(c, rotary), mlp, c.hidden_size, c.rms_norm_eps)


class Glm4MoeForCausalLM(CausalLM):
    config_class = Glm4MoeConfig

    def __init__(self, config: Glm4MoeConfig):
        c = config
        rotary = RotaryEmbedding(c.rotary_dim, c.rope_theta, c.rope_scaling, interleaved=False)
        super().__init__(c, [decoder_layer(c, i, rotary) for i in range(c.num_hidden_layers)])
