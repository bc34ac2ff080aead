"""Dense SwiGLU MLP (DeepSeek's first dense layers, Qwen3 mlp_only_layers, shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moefleet.engine.layers.linear import Linear
from torch import nn


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); parameter names match HF (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
