"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi-K2) over a paged latent KV cache.

The cache stores, per token, the compressed latent c_kv (after kv_a_layernorm) and the roped shared key
k_pe in one row: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]. The step's attention backend
writes and reads it: extend rows (prompt chunks) re-expand keys/values through kv_b_proj for their context;
decode rows, also within a mixed step, use the weight-absorbed form that attends in latent space over the
cached rows as they are (one shared KV head).
Shape legend: T new tokens, H heads, R kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim, B sequences, C_max longest context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moefleet.engine.forward_batch import ForwardBatch
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
        # Decode rows attend in latent space (same result, no per-step re-expansion of the whole context).
        self.absorb_for_decode = True

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.config.kv_lora_rank + self.config.qk_rope_head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
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
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :], batch)
        if num_tokens == 0:
            return self.o_proj(hidden.new_empty(0, c.num_heads * c.v_head_dim))
        entry = torch.cat([latent, k_pe[:, 0]], dim=-1)  # [T, R + Dr]
        out = batch.backend.forward_mla(self, q_nope, q_pe, entry, batch)  # [T, H, Dv]
        return self.o_proj(out.reshape(num_tokens, c.num_heads * c.v_head_dim))

    # ---- kv_b_proj in its two forms (used by the attention backends) ----------------------------------

    def expand_latent(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [..., R] -> per-head keys' nope part [..., H, Dn] and values [..., H, Dv] (prefill)."""
        c = self.config
        kv = self.kv_b_proj(latent).view(*latent.shape[:-1], c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, values = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        return k_nope, values

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        w_kv = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w_kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)  # [H, Dn, R], [H, Dv, R]
        return w_uk, w_uv

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [t, H, Dn] -> latent query [t, H, R] (decode: attend in latent space over cached rows).

        q_nope . (W_uk c) = (W_uk^T q_nope) . c   and   sum_j p_j (W_uv c_j) = W_uv (sum_j p_j c_j).
        """
        w_uk, _ = self._absorbed_weights()
        if _head_matmul_fits(q_nope, w_uk):
            return _head_matmul()(q_nope, w_uk)
        return torch.einsum("thn,hnr->thr", q_nope, w_uk)

    def absorb_output(self, out_latent: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [t, H, R] -> values [t, H, Dv]."""
        _, w_uv = self._absorbed_weights()
        if _head_matmul_fits(out_latent, w_uv):
            return _head_matmul()(out_latent, w_uv.transpose(1, 2))
        return torch.einsum("thr,hvr->thv", out_latent, w_uv)


HEAD_MATMUL_MAX_TOKENS = 128


def _head_matmul_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The per-head Triton matmul on CUDA for up to HEAD_MATMUL_MAX_TOKENS rows (every dot dimension >= 16).
    Measured on H200 at DeepSeek-V3's 128 heads (benchmarks/mla_absorb.py): 64 tokens 14 us vs einsum's 27;
    256 tokens 28 vs 23, where cuBLAS's batched GEMM is better."""
    return (
        x.is_cuda
        and x.dtype == w.dtype
        and x.shape[0] <= HEAD_MATMUL_MAX_TOKENS
        and min(w.shape[1], w.shape[2]) >= 16
    )


def _head_matmul():  # type: ignore[no-untyped-def]
    from moefleet.engine.kernels.head_matmul import head_matmul

    return head_matmul
