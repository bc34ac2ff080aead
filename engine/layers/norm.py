"""RMSNorm computed in float32 and cast back, matching HF (`weight * normed.to(input_dtype)`)."""

from __future__ import annotations

import torch
from moefleet.engine.layers.linear import set_weight_loader
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = set_weight_loader(nn.Parameter(torch.ones(hidden_size), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
