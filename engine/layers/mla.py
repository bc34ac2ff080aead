"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi-K2) over a paged latent KV cache.

The cache stores, per token, the compressed latent c_kv (after kv_a_layernorm) and the roped shared key
k_pe in one row: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]. Prefill steps re-expand keys/values
through kv_b_proj for the attended context; decode steps use the weight-absorbed form that attends in
latent space over the cached rows as they are (one shared KV head).
Shape legend: T new tokens, H heads, R kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim, B sequences, C_max longest context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moefleet.engine.context import get_context
from moefleet.engine.layers.attention import PaddedBatch, padded_batch_for, paged_attention, write_slots
from moefleet.engine.layers.linear import Linear
from moefleet.engine.layers.norm import RMSNorm
from moefleet.engine.layers.rotary import RotaryEmbedding
from torch import nn


@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6


class MLAttention(nn.Module):
    """HF parameter names: q_proj | (q_a_proj, q_a_layernorm, q_b_proj), kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj, o_proj."""

    def __init__(self, config: MLAConfig, rotary: RotaryEmbedding):
        super().__init__()
        c = self.config = config
        self.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, c.num_heads * self.qk_head_dim)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, c.num_heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.rotary = rotary
        self.kv_cache = torch.empty(0)
        # Decode steps attend in latent space (same result, no per-step re-expansion of the whole context).
        self.absorb_for_decode = True

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.config.kv_lora_rank + self.config.qk_rope_head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """positions [T], hidden [T, D] -> [T, D]."""
        c = self.config
        num_tokens = hidden.shape[0]
        if c.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(num_tokens, c.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])
        if num_tokens == 0:
            return self.o_proj(hidden.new_empty(0, c.num_heads * c.v_head_dim))
        entry = torch.cat([latent, k_pe[:, 0]], dim=-1)  # [T, R + Dr]

        ctx = get_context()
        cache_backed = self.kv_cache.numel() > 0
        batch = padded_batch_for(ctx, hidden.device, cache_backed)
        if cache_backed:
            flat = self.kv_cache.view(-1, self.kv_cache.shape[-1])
            write_slots(flat, ctx, entry)
        else:
            flat = entry
        context = flat[batch.kv_source].to(hidden.dtype)  # [B, C_max, R + Dr]
        absorbed = self.absorb_for_decode and not ctx.is_prefill
        attend = self._attend_absorbed if absorbed else self._attend_expanded
        out = attend(q_nope, q_pe, context, batch)  # [T, H, Dv]
        return self.o_proj(out.reshape(num_tokens, c.num_heads * c.v_head_dim))

    def _attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor, batch: PaddedBatch
    ) -> torch.Tensor:
        """Expand the context's latents to per-head keys/values through kv_b_proj, then attend (prefill)."""
        c = self.config
        ctx_latent, ctx_k_pe = context.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(ctx_latent).view(
            *ctx_latent.shape[:2], c.num_heads, c.qk_nope_head_dim + c.v_head_dim
        )
        k_nope, values = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, ctx_k_pe[:, :, None, :].expand(-1, -1, c.num_heads, -1)], dim=-1)
        queries = torch.cat([q_nope, q_pe], dim=-1)
        return paged_attention(queries, keys, values, batch, c.softmax_scale)

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor, batch: PaddedBatch
    ) -> torch.Tensor:
        """Attend in latent space (decode): fold kv_b_proj's key half into the query and its value half
        into the output, so the cached rows are used as they are (one shared KV head, no expansion).

        q_nope . (W_uk c) = (W_uk^T q_nope) . c   and   sum_j p_j (W_uv c_j) = W_uv (sum_j p_j c_j).
        """
        c = self.config
        w_kv = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w_kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)  # [H, Dn, R], [H, Dv, R]
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        queries = torch.cat([q_latent, q_pe], dim=-1)  # [T, H, R + Dr]
        keys = context[:, :, None, :]  # [B, C_max, 1, R + Dr]
        out_latent = paged_attention(queries, keys, keys[..., : c.kv_lora_rank], batch, c.softmax_scale)
        return torch.einsum("thr,hvr->thv", out_latent, w_uv)
