"""gpt-oss experts: `Experts` with per-expert biases and the clamped SwiGLU.

    gate, up = x W_gate^T + b_gate, x W_up^T + b_up
    gate = min(gate, limit); up = clamp(up, -limit, limit)
    out  = ((up + 1) * gate * sigmoid(alpha * gate)) W_down^T + b_down

Weights are stored like `Experts` (w13 [E_local, 2I, D] gate rows then up rows, w2 [E_local, D, I]); the
biases are `w13_bias` [E_local, 2I] (same row order) and `w2_bias` [E_local, D], loaded from full [E, ...]
tensors (this rank's rows are taken). The computation is a loop over experts with rows (a reference path;
a fused kernel would take the biases and the activation as parameters).
Shape legend: N rows grouped by local expert, D hidden, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moefleet.engine.layers.experts import Experts
from torch import nn


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class BiasedClampedExperts(Experts):
    def __init__(
        self, local_experts: range, hidden_size: int, intermediate_size: int, alpha: float, limit: float
    ):
        super().__init__(local_experts, hidden_size, intermediate_size)
        self.alpha, self.limit = alpha, limit
        num_local = len(local_experts)
        self.w13_bias = nn.Parameter(torch.zeros(num_local, 2 * intermediate_size), requires_grad=False)
        self.w2_bias = nn.Parameter(torch.zeros(num_local, hidden_size), requires_grad=False)
        self.w13_bias.weight_loader = self._load_bias  # type: ignore[attr-defined]
        self.w2_bias.weight_loader = self._load_bias  # type: ignore[attr-defined]

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """`loaded` [E, ...] for all experts: this rank's rows go into `param` [E_local, ...]."""
        rows = loaded[self.local_experts.start : self.local_experts.stop]
        if rows.shape != param.shape:
            raise ValueError(
                f"expert bias has shape {tuple(loaded.shape)}, expected [num_experts, {param.shape[1]}] "
                f"covering local experts {self.local_experts.start}..{self.local_experts.stop - 1}"
            )
        with torch.no_grad():
            param.copy_(rows)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """hidden [N, D] grouped by local expert -> [N, D] unweighted outputs."""
        out = torch.empty_like(hidden)
        start = 0
        for local, count in enumerate(tokens_per_expert):
            if count == 0:
                continue
            rows = hidden[start : start + count]
            gate, up = F.linear(rows, self.w13[local], self.w13_bias[local]).chunk(2, dim=-1)
            act = clamped_swiglu(gate, up, self.alpha, self.limit)
            out[start : start + count] = F.linear(act, self.w2[local], self.w2_bias[local])
            start += count
        return out
