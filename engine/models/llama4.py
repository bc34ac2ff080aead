"""Llama-4 text (`Llama4ForCausalLM`; the text model of a `Llama4ForConditionalGeneration` checkpoint,
whose vision tower and projector are skipped): Scout / Maverick.

Attention: GQA; RoPE layers (`no_rope_layers[i] == 1`) rotate q/k (interleaved pairs), then L2-normalise
them (`use_qk_norm`, no weight) and attend within their `attention_chunk_size` chunk; NoPE layers attend
globally and, with `attn_temperature_tuning`, scale q by 1 + attn_scale * log1p(floor((pos + 1) /
floor_scale)). Layers in `moe_layers` are MoE: top-1 sigmoid router scaling the expert input, plus a
shared expert (`layers/moe_variants.py` `InputScaledMoE`); the others a dense SwiGLU of
`intermediate_size_mlp`.
Checkpoint names: `feed_forward.*` (here `mlp.*`), experts stacked as `feed_forward.experts.gate_up_proj`
[E, D, 2I] (gate columns first) and `down_proj` [E, I, D]; a conditional-generation checkpoint prefixes
the text model with `language_model.` (transformers<5) or `model.language_model.` (transformers>=5).
Shape legend: T tokens, H heads, Hk KV heads, Dh head dim.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from moefleet.engine.layers.attention_variants import LocalPagedAttention
from moefleet.engine.layers.linear import Linear
from moefleet.engine.layers.mlp import GatedMLP
from moefleet.engine.layers.moe_variants import InputScaledMoE
from moefleet.engine.layers.rotary import RotaryEmbedding
from moefleet.engine.models.base import CausalLM, DecoderLayer
from moefleet.engine.models.llama4_config import Llama4TextConfig
from torch import nn

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch

# Prefixes of a Llama4ForConditionalGeneration checkpoint: text model -> ours, others skipped.
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
SKIPPED_PREFIXES = (
    "vision_model.",
    "multi_modal_projector.",
    "model.vision_model.",
    "model.multi_modal_projector.",
)
STACKED = re.compile(r"^(?P<module>.+\.mlp\.experts)\.(?P<name>gate_up_proj|down_proj)$")


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in float32 (Llama-4's weightless q/k norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scales(positions: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """[T] -> [T] query scale of NoPE layers: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Llama4Attention(nn.Module):
    def __init__(self, config: Llama4TextConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        bias = c.attention_bias
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.use_rope = c.uses_rope(layer)
        self.rotary = rotary if self.use_rope else None
        self.qk_norm_eps = c.rms_norm_eps if (c.use_qk_norm and self.use_rope) else None
        self.temperature = (
            (c.floor_scale, c.attn_scale) if (c.attn_temperature_tuning and not self.use_rope) else None
        )
        self.attn = LocalPagedAttention(
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.head_dim**-0.5,
            chunk_size=c.layer_chunk(layer),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            # Interleaved pairs as Llama-4's complex rotation; the de-interleaved output order is the same
            # permutation for q and k, so scores (and the permutation-invariant L2 norm) are unchanged.
            q, k = self.rotary(positions, q, k, batch)
        if self.qk_norm_eps is not None:
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature is not None:
            scales = temperature_scales(positions, *self.temperature)
            q = (q * scales[:, None, None]).to(q.dtype)
        out = self.attn(q, k, v, batch)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


def decoder_layer(config: Llama4TextConfig, layer: int, rotary: RotaryEmbedding) -> DecoderLayer:
    c = config
    mlp: nn.Module
    if c.is_moe_layer(layer):
        shared = GatedMLP(c.hidden_size, c.intermediate_size)
        mlp = InputScaledMoE(
            c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, shared
        )
    else:
        mlp = GatedMLP(c.hidden_size, c.intermediate_size_mlp)
    return DecoderLayer(Llama4Attention(c, layer, rotary), mlp, c.hidden_size, c.rms_norm_eps)


def text_name(name: str) -> str | None:
    """A checkpoint name as this model's, or None for the vision tower / projector."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    for prefix, replacement in TEXT_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name[len(prefix) :]
            break
    return name.replace(".feed_forward.", ".mlp.")


class Llama4ForCausalLM(CausalLM):
    config_class = Llama4TextConfig

    def __init__(self, config: Llama4TextConfig):
        c = config
        rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, interleaved=True)
        super().__init__(c, [decoder_layer(c, i, rotary) for i in range(c.num_hidden_layers)])

    def skip_weight(self, name: str) -> bool:
        mapped = text_name(name)
        return mapped is None or super().skip_weight(mapped)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        return super().load_weights(self._from_hf(weights), strict)

    def _from_hf(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            mapped = text_name(name)
            if mapped is None:
                continue
            if STACKED.match(mapped):  # [E, in, out] -> [E, out, in] (gate rows then up rows for gate_up)
                tensor = tensor.transpose(1, 2)
            yield mapped, tensor
