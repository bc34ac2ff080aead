"""gpt-oss experts: `Experts` with per-expert biases and the clamped SwiGLU.

    gate, up = x W_gate^T + b_gate, x W_up^T + b_up
    gate = min(gate, limit); up = clamp(up, -limit, limit)
    out  = ((up + 1) * gate * sigmoid(alpha * gate)) W_down^T + b_down

Weights are stored like `Experts` (w13 [E_local, 2I, D] gate rows then up rows, w2 [E_local, D, I]); the
biases are `w13_bias` [E_local, 2I] (same row order) and `w2_bias` [E_local, D], loaded from full [E, ...]
tensors (this rank's rows are taken). The computation is the two reference paths of `Experts` (padded
batched matmul or loop over experts) with biases and the clamped activation; a fused grouped-GEMM kernel
would take the biases and the activation as parameters.
Shape legend: N rows grouped by local expert, D hidden, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from moefleet.engine.layers.experts import PAD_FACTOR, PAD_MIN_ROWS, Experts
from moefleet.engine.layers.token_dispatch import HostCounts, counts_on_host
from torch import nn


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class BiasedClampedExperts(Experts):
    # The torch paths read the rows per expert on the host (a sync, shapes that change per step): a model
    # with these experts runs eagerly until a fused kernel takes the biases and the clamp.
    supports_cuda_graphs = False

    def __init__(
        self,
        local_experts: Sequence[int],
        hidden_size: int,
        intermediate_size: int,
        alpha: float,
        limit: float,
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
        if (
            loaded.dim() != 2
            or loaded.shape[1] != param.shape[1]
            or loaded.shape[0] <= max(self.local_experts)
        ):
            raise ValueError(
                f"expert bias has shape {tuple(loaded.shape)}, expected [num_experts, {param.shape[1]}] "
                f"covering local experts {sorted(set(self.local_experts))}"
            )
        with torch.no_grad():
            param.copy_(loaded[torch.tensor(self.local_experts, dtype=torch.long)])  # one row per local slot

    def slot_tensors(self) -> list[torch.Tensor]:
        """EPLB moves the biases with their slot's weights."""
        return [*super().slot_tensors(), self.w13_bias, self.w2_bias]

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        tokens_per_expert: list[int] | None = None,
        *,
        counts: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        expected_rows: int | None = None,
        host_sync_ok: bool = False,
        host_counts: HostCounts | None = None,
    ) -> torch.Tensor:
        """hidden [N, D] grouped by local expert -> [N, D] unweighted outputs.

        As `Experts.forward`: one batched matmul over rows padded to the busiest expert while padding
        stays small (decode, balanced prefill), else a loop over the experts that have rows.
        """
        if hidden.dim() == 3 or scales is not None:
            raise ValueError(
                "gpt-oss experts (biases, clamped SwiGLU) have no masked/FP8-row kernel: serve with "
                "--moe-backend a2a or symm, or deepep in normal mode"
            )
        if tokens_per_expert is None:  # device counts (a CUDA dispatcher): rows past their sum are padding
            assert counts is not None
            tokens_per_expert = counts_on_host(counts, host_counts)
            valid = sum(tokens_per_expert)
            if valid < hidden.shape[0]:
                out = torch.zeros_like(hidden)
                out[:valid] = self.forward(hidden[:valid], tokens_per_expert)
                return out
        num_rows = hidden.shape[0]
        if num_rows == 0:
            return torch.empty_like(hidden)
        if len(tokens_per_expert) * max(tokens_per_expert) <= max(PAD_FACTOR * num_rows, PAD_MIN_ROWS):
            return self.forward_padded(hidden, tokens_per_expert)
        return self.forward_loop(hidden, tokens_per_expert)

    def forward_loop(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
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

    def forward_padded(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        counts = torch.tensor(tokens_per_expert, device=hidden.device)
        expert = torch.repeat_interleave(torch.arange(len(tokens_per_expert), device=hidden.device), counts)
        position = (
            torch.arange(hidden.shape[0], device=hidden.device) - (torch.cumsum(counts, 0) - counts)[expert]
        )
        padded = hidden.new_zeros(len(tokens_per_expert), max(tokens_per_expert), hidden.shape[1])
        padded[expert, position] = hidden
        gate_up = torch.baddbmm(self.w13_bias[:, None, :], padded, self.w13.transpose(1, 2))
        gate, up = gate_up.chunk(2, dim=-1)
        act = clamped_swiglu(gate, up, self.alpha, self.limit)
        out = torch.baddbmm(self.w2_bias[:, None, :], act, self.w2.transpose(1, 2))
        return out[expert, position]
