"""Data-parallel attention: the per-step agreement between DP ranks, and least-load rank picking.

Every rank runs its own scheduler, but MoE layers issue collectives, so every rank must run a forward in
the same step with the same forward mode. Each step all ranks all-gather a few integers over the CPU group
and reduce them identically (SGLang-style): run if ANY rank has work (ranks without work run an idle step
with T = 0), prefill if ANY rank prefills, two-batch overlap only if ALL ranks can, CUDA graphs only if ALL
ranks can (idle ones included: they replay the group's bucket with padding rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What one rank would like to do this step."""

    num_tokens: int = 0
    is_prefill: bool = False
    has_work: bool = False
    can_use_tbo: bool = False
    can_use_graph: bool = False

    def to_ints(self) -> list[int]:
        return [self.num_tokens, int(self.is_prefill), int(self.has_work), int(self.can_use_tbo),
                int(self.can_use_graph)]  # fmt: skip


NUM_FIELDS = 5


@dataclass(frozen=True, slots=True)
class GroupStep:
    """What the whole group does this step (identical on every rank)."""

    run: bool  # False: nobody has work, skip the forward entirely (all ranks agree)
    is_prefill: bool
    use_tbo: bool
    use_graph: bool
    tokens_per_rank: tuple[int, ...]

    @property
    def max_tokens(self) -> int:
        return max(self.tokens_per_rank, default=0)

    def is_idle(self, rank: int) -> bool:
        """This rank runs an idle (T = 0) forward so its collectives line up with the others."""
        return self.run and self.tokens_per_rank[rank] == 0


def reduce_step_infos(infos: Sequence[StepInfo]) -> GroupStep:
    """Pure: run = any has_work; prefill = any; TBO and graphs only if every rank that runs can use them."""
    if not infos:
        raise ValueError("reduce_step_infos needs at least one rank's StepInfo")
    run = any(i.has_work for i in infos)
    return GroupStep(
        run=run,
        is_prefill=run and any(i.is_prefill for i in infos),
        # Idle ranks can follow any TBO mode, so only ranks with work vote on it; a graph step replays one
        # bucket on every rank (idle ones replay padding), so every rank must hold that graph: all vote.
        use_tbo=run and all(i.can_use_tbo for i in infos if i.has_work),
        use_graph=run and all(i.can_use_graph for i in infos) and not any(i.is_prefill for i in infos),
        tokens_per_rank=tuple(i.num_tokens if i.has_work else 0 for i in infos),
    )


class DPStepCoordinator:
    """Runs the per-step all-gather over the CPU (gloo) group. Every rank must call `sync` every step."""

    def __init__(self, cpu_group: dist.ProcessGroup | None):
        self.group = cpu_group
        self.world_size = 1 if cpu_group is None else dist.get_world_size(cpu_group)

    def sync(self, local: StepInfo) -> GroupStep:
        if self.group is None or self.world_size == 1:
            return reduce_step_infos([local])
        mine = torch.tensor(local.to_ints(), dtype=torch.int64)
        gathered = [torch.empty(NUM_FIELDS, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        infos = [
            StepInfo(int(t), bool(p), bool(w), bool(tbo), bool(g))
            for t, p, w, tbo, g in (row.tolist() for row in gathered)
        ]
        return reduce_step_infos(infos)


def pick_dp_rank(loads: Sequence[int], start: int = 0) -> int:
    """Pure: the rank with the least load (tokens running + queued). Ties go to the first rank at or after
    `start` (pass a rotating start so equal ranks take turns instead of rank 0 always winning)."""
    if not loads:
        raise ValueError("pick_dp_rank needs the load of at least one rank")
    n = len(loads)
    candidates = [(start + i) % n for i in range(n)]  # visiting order decides ties
    return min(candidates, key=lambda rank: loads[rank])
