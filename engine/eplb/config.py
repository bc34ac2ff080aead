"""EPLB settings of one serving group (the `moefleet serve` EPLB flags), validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EPLBConfig:
    num_redundant_experts: int = 0  # extra physical slots: copies of busy experts
    enabled: bool = False  # record load and accept rebalances even without redundant slots
    window_steps: int = 1000  # load is summed over this many recent engine steps
    interval_steps: int = 0  # automatic rebalance every K steps; 0 = only on request
    layers_per_step: int = 8  # MoE layers moved per step boundary, so one pause stays bounded
    stats_every_steps: int = 100  # group-wide load read (all-reduce) for /metrics this often

    def __post_init__(self) -> None:
        if self.num_redundant_experts < 0:
            raise ValueError(f"--num-redundant-experts ({self.num_redundant_experts}) must be >= 0")
        if self.window_steps < 1:
            raise ValueError(f"--eplb-window-steps ({self.window_steps}) must be >= 1")
        if self.interval_steps < 0:
            raise ValueError(
                f"--eplb-interval-steps ({self.interval_steps}) must be >= 0 (0 = only on request)"
            )
        if self.layers_per_step < 1 or self.stats_every_steps < 1:
            raise ValueError("layers_per_step and stats_every_steps must be >= 1")

    @property
    def active(self) -> bool:
        """Whether a recorder and controller run at all."""
        return self.enabled or self.num_redundant_experts > 0 or self.interval_steps > 0
