"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head q/k RMSNorm, softmax top-k MoE.

Layer i is sparse when it is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0.
Shape legend: T tokens, D hidden, H heads, Hk KV heads, Dh head dim.
"""

from __future__ import annotations

import torch
from moefleet.engine.forward_batch import ForwardBatch
from moefleet.engine.layers.attention import PagedAttention
from moefleet.engine.layers.linear import Linear
from moefleet.engine.layers.mlp import GatedMLP
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.norm import RMSNorm
from moefleet.engine.layers.rotary import RotaryEmbedding
from moefleet.engine.layers.router import RoutingConfig
from moefleet.engine.models.base import CausalLM, DecoderLayer
from moefleet.engine.models.configs import Qwen3MoeConfig
from torch import nn


class Qwen3MoeAttention(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, rotary: RotaryEmbedding):
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
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.rotary = rotary
        self.attn = PagedAttention(c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_norm(self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim))
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k, batch)
        out = self.attn(q, k, v, batch)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


def decoder_layer(config: Qwen3MoeConfig, layer: int, rotary: RotaryEmbedding) -> DecoderLayer:
    c = config
    mlp: nn.Module
    if c.is_moe_layer(layer):
        routing = RoutingConfig(
            num_experts=c.num_experts,
            top_k=c.num_experts_per_tok,
            scoring="softmax",
            norm_topk_prob=c.norm_topk_prob,
        )
        mlp = MoE(c.hidden_size, c.moe_intermediate_size, routing)
    else:
        mlp = GatedMLP(c.hidden_size, c.intermediate_size)
    return DecoderLayer(Qwen3MoeAttention(c, rotary), mlp, c.hidden_size, c.rms_norm_eps)


class Qwen3MoeForCausalLM(CausalLM):
    config_class = Qwen3MoeConfig

    def __init__(self, config: Qwen3MoeConfig):
        c = config
        rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, interleaved=False)
        super().__init__(c, [decoder_layer(c, i, rotary) for i in range(c.num_hidden_layers)])
