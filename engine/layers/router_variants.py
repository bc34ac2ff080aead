"""Routers of the emerging families (same contract as `layers/router.py`: hidden [T, D] -> (weights [T, K]
float32, logical ids [T, K] int64)).

- `TopkSoftmaxRouter` (gpt-oss): logits = x W^T + b; the top-k logits are chosen, and their softmax (over
  the k chosen only) are the combine weights.
- `TopkSigmoidRouter` (Llama-4): logits = x W^T; top-k logits, each expert's weight is sigmoid(its logit).
  Llama-4 multiplies the expert's INPUT by this weight (see `moe_variants.InputScaledMoE`).
Shape legend: T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moefleet.engine.layers.linear import set_weight_loader
from torch import nn


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts ({num_experts})]")


class TopkSoftmaxRouter(nn.Module):
    """gpt-oss router: weight [E, D] and bias [E] (HF `mlp.router.weight` / `.bias`)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        _check_top_k(top_k, num_experts)
        self.top_k = top_k
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        )
        self.bias = set_weight_loader(nn.Parameter(torch.zeros(num_experts), requires_grad=False))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden, self.weight, self.bias)  # [T, E]
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=torch.float32), ids


class TopkSigmoidRouter(nn.Module):
    """Llama-4 router: weight [E, D] (HF `feed_forward.router.weight`), no bias."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        _check_top_k(top_k, num_experts)
        self.top_k = top_k
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden, self.weight)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.sigmoid(top.float()), ids
