"""Apply expert parallelism to a built model from the outside (torchtitan `ExpertParallel` style).

Model code builds only this rank's experts (it reads `topology.current()`, set by
`set_expert_parallel_layout` before the model is built) and holds a single-rank `LocalDispatcher`.
`apply_expert_parallel` then walks the modules and installs group-aware dispatchers. MoE layers are found by
duck typing: a module with a `dispatcher` attribute and an `experts` child whose `local_experts` lists what
its physical slots hold (a range of expert ids, or the logical expert per slot under EPLB); rank r owns
physical slots [r * S, (r + 1) * S), S = len(local_experts). For two-batch overlap each layer gets one dispatcher per micro-batch in
`layer.dispatchers` (handles must not cross micro-batches); `layer.dispatcher` is micro-batch 0's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch.distributed as dist
from moefleet.engine import topology
from moefleet.engine.distributed.backends import make_dispatcher
from moefleet.engine.layers.token_dispatch import TokenDispatcher
from torch import nn


def set_expert_parallel_layout(
    group: dist.ProcessGroup | None, num_redundant_experts: int = 0, ranks_per_node: int = 0
) -> topology.Topology:
    """Publish this rank's place in the EP group (and the EPLB redundant slot count, ranks per node) so model
    construction allocates only this rank's expert slots."""
    layout = (
        topology.Topology(num_redundant_experts=num_redundant_experts)
        if group is None
        else topology.Topology.for_rank(
            dist.get_rank(group), dist.get_world_size(group), ranks_per_node, num_redundant_experts
        )
    )
    topology.set_current(layout)
    return layout


def moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every MoE layer: has `dispatcher` and `experts.local_experts`."""
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if hasattr(module, "dispatcher") and isinstance(
            getattr(experts, "local_experts", None), range | list
        ):
            yield name, module


def num_physical_experts(layer: nn.Module, world_size: int) -> int:
    """Physical experts across the group = local experts on this rank x ranks (equal slots per rank)."""
    return len(layer.experts.local_experts) * world_size  # type: ignore[union-attr,arg-type]


def apply_expert_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None,
    backend: str = "auto",
    *,
    num_micro_batches: int = 1,
    make: Callable[..., TokenDispatcher] = make_dispatcher,
    built_for_size: int | None = None,
    **dispatcher_options: object,
) -> int:
    """Install `num_micro_batches` dispatchers on every MoE layer of `model`; returns the number of layers.

    Checks that each layer was built for this rank's expert slots (built after `set_expert_parallel_layout`),
    because a layer holding all experts under EP would silently compute with the wrong experts.
    `built_for_size`: the EP size the layers were built for when it is not the group's (`moefleet bench
    --emulate-ep N` on W < N ranks: rank r holds rank r's slots of an N-way layout); the group's physical
    experts stay local slots x W.
    """
    if num_micro_batches not in (1, 2):
        raise ValueError(f"num_micro_batches ({num_micro_batches}) must be 1 or 2 (two-batch overlap)")
    rank = 0 if group is None else dist.get_rank(group)
    world_size = 1 if group is None else dist.get_world_size(group)
    count = 0
    for name, layer in moe_layers(model):
        _check_built_for(name, layer, rank, built_for_size or world_size)
        total = num_physical_experts(layer, world_size)
        dispatchers = [make(backend, group, total, **dispatcher_options) for _ in range(num_micro_batches)]
        # setattr: nn.Module's typed __setattr__ does not know these plain attributes.
        setattr(layer, "dispatchers", dispatchers)  # noqa: B010
        setattr(layer, "dispatcher", dispatchers[0])  # noqa: B010
        count += 1
    return count


def has_fp8_experts(model: nn.Module) -> bool:
    """Whether the routed experts hold block-FP8 weights (DeepEP low-latency then dispatches FP8 rows)."""
    return any(getattr(layer.experts, "block_shape", None) is not None for _, layer in moe_layers(model))


def _check_built_for(name: str, layer: nn.Module, rank: int, world_size: int) -> None:
    local: range | list[int] = layer.experts.local_experts  # type: ignore[union-attr,assignment]
    if isinstance(local, list):  # EPLB slots (MoE): any expert per slot; the layer knows its rank
        built_for = (getattr(layer, "ep_rank", rank), getattr(layer, "ep_size", world_size))
        if built_for != (rank, world_size):
            raise ValueError(
                f"MoE layer {name!r} was built for rank {built_for[0]} of {built_for[1]}, not rank {rank} of "
                f"{world_size}: call set_expert_parallel_layout(group) before building the model"
            )
        return
    expected_start = rank * len(local)
    if local.start != expected_start or local.step != 1:
        raise ValueError(
            f"MoE layer {name!r} holds experts {local.start}..{local.stop - 1} but rank {rank} of "
            f"{world_size} must hold {expected_start}..{expected_start + len(local) - 1}: call "
            "set_expert_parallel_layout(group) before building the model"
        )


def count_routed_expert_parameters(model: nn.Module) -> int:
    """Number of routed-expert parameter elements resident on this rank (shared experts excluded)."""
    total = 0
    for _, layer in moe_layers(model):
        experts: nn.Module = layer.experts  # type: ignore[assignment]
        total += sum(p.numel() for p in experts.parameters())
    return total
