"""Expert load recorder: per-layer logical-expert token counts, on device, over a sliding window of steps.

Each MoE layer adds its routed (token, logical expert) hits into its row of `current` [L, E] (a scatter-add
on device inside the forward, no host sync; the layer's `expert_load` is a view of that row). At step
boundaries `step()` rolls finished buckets into a ring of B buckets, so the window is the last B - 1
buckets plus the one being filled (window_steps / B steps per bucket, B <= 16: the window slides in
bucket-sized steps and memory stays at B x L x E counters instead of one row per step). `read()` sums the
window and all-reduces it over the expert-parallel group: a collective, so every rank calls it at the
same step boundary (the EPLB controller sees to that).
Shape legend: L MoE layers, E logical experts, B buckets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

MAX_BUCKETS = 16


class ExpertLoadRecorder:
    def __init__(
        self, num_layers: int, num_logical: int, window_steps: int, device: torch.device | str = "cpu"
    ):
        self.window_steps = window_steps
        self.num_buckets = min(MAX_BUCKETS, max(window_steps, 1))
        self.bucket_steps = -(-window_steps // self.num_buckets)
        self.current = torch.zeros(num_layers, num_logical, dtype=torch.int64, device=device)  # [L, E]
        self.ring = torch.zeros(self.num_buckets, num_layers, num_logical, dtype=torch.int64, device=device)
        self.routed_total = torch.zeros((), dtype=torch.int64, device=device)  # hits ever, this rank
        self._next = 0  # ring slot the next finished bucket goes to
        self._steps_in_bucket = 0
        self.steps_in_window = 0

    def attach(self, layers: Sequence[nn.Module]) -> None:
        """Point every MoE layer's `expert_load` at its row of `current`."""
        for i, layer in enumerate(layers):
            layer.expert_load = self.current[i]

    def step(self) -> None:
        """One engine forward finished (host bookkeeping; device work only when a bucket fills)."""
        self._steps_in_bucket += 1
        self.steps_in_window = min(self.steps_in_window + 1, self.window_steps)
        if self._steps_in_bucket == self.bucket_steps:
            self.routed_total += self.current.sum()
            self.ring[self._next].copy_(self.current)
            self.current.zero_()
            self._next = (self._next + 1) % self.num_buckets
            # The slot after the newest is the oldest: clear it so the window is B - 1 buckets + current.
            self.ring[self._next].zero_()
            self._steps_in_bucket = 0

    def local_window(self) -> torch.Tensor:
        """This rank's counts over the window [L, E] (device)."""
        return self.ring.sum(dim=0) + self.current

    def read(self, group: dist.ProcessGroup | None = None) -> list[list[int]]:
        """Group-wide counts over the window [L][E] (all-reduce over `group`; collective)."""
        window = self.local_window()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(window, group=group)
        return window.cpu().tolist()

    def routed_tokens_total(self) -> int:
        """(token, expert) hits routed by this rank since start (host sync: read only when scraped)."""
        return int(self.routed_total + self.current.sum())

    def reset(self) -> None:
        """Start a new window (after a rebalance, so the next reading describes the new placement)."""
        self.routed_total += self.current.sum()
        self.current.zero_()
        self.ring.zero_()
        self._steps_in_bucket = 0
        self.steps_in_window = 0
