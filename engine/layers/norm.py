"""RMSNorm computed in float32 and cast back, matching HF (`weight * normed.to(input_dtype)`).

On CUDA the forward runs as one fused Triton kernel (engine/kernels/rms_norm.py, same rounding); elsewhere (and
for shapes the kernel does not take) the torch ops below, which are also its test reference."""

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
        if x.is_cuda:
            from moefleet.engine.kernels.rms_norm import fused_rms_norm_supported, rms_norm

            if fused_rms_norm_supported(x, self.weight):
                return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch formula (Hugging Face's): float32 statistics, cast back, then the weight."""
    input_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype)
