"""This rank's routed experts, stored stacked, and their grouped SwiGLU computation.

w13 [E_local, 2*I, D] holds gate (rows :I) and up (rows I:) projections; w2 [E_local, D, I] the down
projection. Only this rank's physical slots are allocated; `local_experts[s]` is the logical expert slot s
holds (any expert, several slots may hold the same one: EPLB replicas). The weight loader fills every slot
holding a checkpoint expert and silently skips the others, so one loader serves every placement. Tensors
with one row per slot (leading dim E_local) are what EPLB moves between ranks (`slot_tensors`).
Shape legend: N rows grouped by local expert, D hidden, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SHARDS = ("gate", "up", "down")
# Padded batched matmul is used while E_local * max_count <= max(PAD_FACTOR * N, PAD_MIN_ROWS).
PAD_FACTOR = 4
PAD_MIN_ROWS = 4096


class Experts(nn.Module):
    def __init__(self, local_experts: Sequence[int], hidden_size: int, intermediate_size: int):
        super().__init__()
        self.local_experts: list[int] = list(local_experts)  # logical expert of each local slot
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        num_local = len(local_experts)
        self.w13 = nn.Parameter(
            torch.empty(num_local, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, intermediate_size), requires_grad=False)
        self.w13.weight_loader = self._load_per_expert  # type: ignore[attr-defined]
        self.w2.weight_loader = self._load_per_expert  # type: ignore[attr-defined]
        self.loaded: set[tuple[int, str]] = set()  # (logical expert, shard) seen, for completeness checks

    def _load_per_expert(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard: str) -> None:
        """Load checkpoint `experts.{expert_id}.{shard}_proj.weight` into every slot holding that expert."""
        for local in self.slots_of(expert_id):
            self._load_slot(local, loaded, expert_id, shard)

    def slots_of(self, expert_id: int) -> list[int]:
        """Local slots holding logical expert `expert_id` (empty when it lives on other ranks only)."""
        return [slot for slot, e in enumerate(self.local_experts) if e == expert_id]

    def slot_tensors(self) -> list[torch.Tensor]:
        """Tensors with one row per local slot: what moves when a slot changes expert (EPLB)."""
        return [self.w13, self.w2]

    def _load_slot(self, local: int, loaded: torch.Tensor, expert_id: int, shard: str) -> None:
        inter = self.intermediate_size
        if shard == "gate":
            target = self.w13[local, :inter]
        elif shard == "up":
            target = self.w13[local, inter:]
        elif shard == "down":
            target = self.w2[local]
        else:
            raise ValueError(f"unknown expert shard {shard!r} (expected one of {SHARDS})")
        if target.shape != loaded.shape:
            raise ValueError(
                f"expert {expert_id} {shard}_proj has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(loaded)
        self.loaded.add((expert_id, shard))

    def load_stacked(self, name: str, loaded: torch.Tensor) -> None:
        """Load transformers>=5 stacked tensors: `gate_up_proj` [E, 2I, D] or `down_proj` [E, D, I] (all experts)."""
        if name == "gate_up_proj":
            for local, expert_id in enumerate(self.local_experts):
                self._load_slot(local, loaded[expert_id, : self.intermediate_size], expert_id, "gate")
                self._load_slot(local, loaded[expert_id, self.intermediate_size :], expert_id, "up")
        elif name == "down_proj":
            for local, expert_id in enumerate(self.local_experts):
                self._load_slot(local, loaded[expert_id], expert_id, "down")
        else:
            raise ValueError(f"unknown stacked expert tensor {name!r}")

    def missing(self) -> list[str]:
        return [
            f"expert {e} {s}_proj"
            for e in sorted(set(self.local_experts))
            for s in SHARDS
            if (e, s) not in self.loaded
        ]

    def forward(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """hidden [N, D] grouped by local expert (counts in `tokens_per_expert`) -> [N, D] unweighted outputs.

        Two interchangeable reference paths (a grouped GEMM kernel can replace both): one batched matmul
        over rows padded to the busiest expert when padding stays small (few launches: decode, balanced
        prefill), else a loop over the experts that have rows (heavily skewed routing).
        """
        num_rows = hidden.shape[0]
        if num_rows == 0:
            return torch.empty_like(hidden)
        padded_rows = len(tokens_per_expert) * max(tokens_per_expert)
        if padded_rows <= max(PAD_FACTOR * num_rows, PAD_MIN_ROWS):
            return self.forward_padded(hidden, tokens_per_expert)
        return self.forward_loop(hidden, tokens_per_expert)

    def forward_loop(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        out = torch.empty_like(hidden)
        start = 0
        for local, count in enumerate(tokens_per_expert):
            if count == 0:
                continue
            rows = hidden[start : start + count]
            gate, up = F.linear(rows, self.w13[local]).chunk(2, dim=-1)
            out[start : start + count] = F.linear(F.silu(gate) * up, self.w2[local])
            start += count
        return out

    def forward_padded(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # [N] -> (expert, position within the expert's rows), then [E_local, max_count, D] x w13^T ...
        counts = torch.tensor(tokens_per_expert, device=hidden.device)
        expert = torch.repeat_interleave(torch.arange(len(tokens_per_expert), device=hidden.device), counts)
        position = (
            torch.arange(hidden.shape[0], device=hidden.device) - (torch.cumsum(counts, 0) - counts)[expert]
        )
        padded = hidden.new_zeros(len(tokens_per_expert), max(tokens_per_expert), hidden.shape[1])
        padded[expert, position] = hidden
        gate, up = torch.bmm(padded, self.w13.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))
        return out[expert, position]
