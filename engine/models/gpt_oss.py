"""gpt-oss (`GptOssForCausalLM`, gpt-oss-20b / -120b): GQA with sinks and alternating sliding-window
layers, yarn RoPE, and an MoE in every layer (top-k softmax router with bias, experts with biases and the
clamped SwiGLU).

Checkpoint layout (HF): `mlp.router.{weight,bias}`, experts stacked per layer as `mlp.experts.gate_up_proj`
[E, D, 2I] (gate and up INTERLEAVED along the last axis: gate = [..., 0::2], up = [..., 1::2]),
`gate_up_proj_bias` [E, 2I], `down_proj` [E, I, D], `down_proj_bias` [E, D]; or, as released, MXFP4
`*_blocks` / `*_scales` of the [E, out, in] matrices (models/mxfp4.py). The loader converts them into
this rank's per-expert `gate_proj` / `up_proj` / `down_proj` (only local experts are dequantized).
Shape legend: T tokens, H heads, Hk KV heads, Dh head dim, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from moefleet.engine.layers.attention import PagedAttention
from moefleet.engine.layers.experts import Experts
from moefleet.engine.layers.linear import Linear, set_weight_loader
from moefleet.engine.layers.moe_variants import GptOssMoE
from moefleet.engine.layers.norm import RMSNorm
from moefleet.engine.layers.rotary import RotaryEmbedding
from moefleet.engine.models.base import CausalLM, DecoderLayer
from moefleet.engine.models.gpt_oss_config import GptOssConfig
from moefleet.engine.models.mxfp4 import BLOCKS_SUFFIX, SCALES_SUFFIX, dequantize_mxfp4
from torch import nn

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch

STACKED = re.compile(
    r"^(?P<module>.+\.mlp\.experts)\.(?P<name>gate_up_proj|down_proj)(?P<suffix>_bias|_blocks|_scales)?$"
)


class GptOssRMSNorm(RMSNorm):
    """gpt-oss multiplies the weight before casting back (`(w * x_normed_f32).to(dtype)`); same in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class GptOssAttention(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int, rotary: RotaryEmbedding):
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
        self.sinks = set_weight_loader(nn.Parameter(torch.zeros(c.num_attention_heads), requires_grad=False))
        self.rotary = rotary
        # The attention backend runs the window and the sinks (torch reference or the Triton kernels).
        self.attn = PagedAttention(
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.head_dim**-0.5,
            sliding_window=c.layer_window(layer),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k, batch)
        out = self.attn(q, k, v, batch, sinks=self.sinks)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


def decoder_layer(config: GptOssConfig, layer: int, rotary: RotaryEmbedding) -> DecoderLayer:
    c = config
    mlp = GptOssMoE(
        c.hidden_size,
        c.intermediate_size,
        c.num_local_experts,
        c.num_experts_per_tok,
        c.swiglu_alpha,
        c.swiglu_limit,
    )
    block = DecoderLayer(GptOssAttention(c, layer, rotary), mlp, c.hidden_size, c.rms_norm_eps)
    block.input_layernorm = GptOssRMSNorm(c.hidden_size, c.rms_norm_eps)
    block.post_attention_layernorm = GptOssRMSNorm(c.hidden_size, c.rms_norm_eps)
    return block


class GptOssForCausalLM(CausalLM):
    config_class = GptOssConfig

    def __init__(self, config: GptOssConfig):
        c = config
        rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, interleaved=False)
        super().__init__(c, [decoder_layer(c, i, rotary) for i in range(c.num_hidden_layers)])
        self.model.norm = GptOssRMSNorm(c.hidden_size, c.rms_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        return super().load_weights(self._from_hf(weights), strict)

    def _from_hf(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """HF gpt-oss names/layouts -> the names `CausalLM.load_weights` knows (per-expert, gate rows first)."""
        pending: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 tensors waiting for their partner
        for name, tensor in weights:
            name = name.replace(".mlp.router.", ".mlp.gate.")
            stacked = STACKED.match(name)
            if not stacked:
                yield name, tensor
                continue
            module, kind, suffix = stacked["module"], stacked["name"], stacked["suffix"]
            if suffix == "_bias":
                if kind == "gate_up_proj":  # interleaved -> gate columns then up columns
                    tensor = torch.cat([tensor[:, 0::2], tensor[:, 1::2]], dim=1)
                yield f"{module}.{'w13' if kind == 'gate_up_proj' else 'w2'}_bias", tensor
            elif suffix is None:  # unquantized, [E, in, out]
                yield from _per_expert(module, kind, tensor.transpose(1, 2), self._local(module, name))
            else:
                parts = pending.setdefault(f"{module}.{kind}", {})
                parts[suffix] = tensor
                if len(parts) == 2:
                    del pending[f"{module}.{kind}"]
                    local = self._local(module, name)
                    index = torch.tensor(local, dtype=torch.long)
                    blocks = parts[BLOCKS_SUFFIX][index]
                    scales = parts[SCALES_SUFFIX][index]
                    dense = dequantize_mxfp4(blocks, scales, self.lm_head.weight.dtype)  # [E_local, out, in]
                    yield from _per_expert(module, kind, dense, local, compact=True)
        if pending:
            missing = [
                f"{n}{SCALES_SUFFIX if BLOCKS_SUFFIX in p else BLOCKS_SUFFIX}" for n, p in pending.items()
            ]
            raise ValueError(f"MXFP4 checkpoint is missing {', '.join(sorted(missing))}")

    def _local(self, module: str, name: str) -> list[int]:
        """The logical experts this rank holds in that layer (each once, also when several slots hold it)."""
        experts = self._experts(module, name)
        assert isinstance(experts, Experts)
        return sorted(set(experts.local_experts))


def _per_expert(
    module: str, kind: str, matrices: torch.Tensor, local: list[int], compact: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """matrices [E, out, in] (or [len(local), out, in] when `compact`) -> this rank's
    `{module}.{e}.{gate,up,down}_proj.weight` [out, in]."""
    for i, expert in enumerate(local):
        matrix = matrices[i] if compact else matrices[expert]
        if kind == "gate_up_proj":
            yield f"{module}.{expert}.gate_proj.weight", matrix[0::2]
            yield f"{module}.{expert}.up_proj.weight", matrix[1::2]
        else:
            yield f"{module}.{expert}.down_proj.weight", matrix
