"""Plain linear layer whose parameters know how to load themselves from checkpoint tensors.

Every parameter carries a `weight_loader(param, loaded)` (nano-vllm style) so the model's `load_weights` is
a name lookup; layers that pack several checkpoint tensors into one parameter define their own loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter | torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a checkpoint tensor into `param`, converting dtype; shapes must match exactly."""
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def set_weight_loader(param: nn.Parameter, loader=default_weight_loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class Linear(nn.Module):
    """y = x W^T (+ b). W is [out_features, in_features] exactly as in HF checkpoints."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), False)
        )
        self.bias = (
            set_weight_loader(nn.Parameter(torch.zeros(out_features, dtype=dtype), False)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
