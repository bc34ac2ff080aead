"""Pick a TokenDispatcher by backend name: "local", "a2a", "deepep" or "auto"."""

from __future__ import annotations

import torch.distributed as dist
from moefleet.engine.distributed.a2a import AllToAllDispatcher
from moefleet.engine.distributed.deepep import INSTALL_HINT, DeepEPDispatcher, deep_ep_available
from moefleet.engine.layers.token_dispatch import LocalDispatcher, TokenDispatcher

BACKENDS = ("local", "a2a", "deepep", "auto")


def resolve_backend(backend: str, world_size: int, device_type: str, deep_ep_importable: bool) -> str:
    """Pure: the concrete backend for a request. "auto" = local on one rank, DeepEP on CUDA when importable,
    else a2a."""
    if backend not in BACKENDS:
        raise ValueError(f"moe backend ({backend!r}) must be one of {BACKENDS}")
    if backend == "auto":
        if world_size == 1:
            return "local"
        return "deepep" if device_type == "cuda" and deep_ep_importable else "a2a"
    if backend == "local" and world_size > 1:
        raise ValueError(
            f"moe backend 'local' keeps every expert on one rank but the expert-parallel group has {world_size} "
            "ranks: use --moe-backend a2a (or deepep, or auto)"
        )
    return backend


def make_dispatcher(
    backend: str,
    group: dist.ProcessGroup | None,
    num_experts: int,
    *,
    hidden_size: int = 0,
    device_type: str = "cpu",
    deepep_mode: str = "normal",
    max_tokens_per_rank: int = 128,
) -> TokenDispatcher:
    """Build one dispatcher for one MoE layer (and one micro-batch). `num_experts` counts physical experts
    across the whole group; `group` may be None only for "local"."""
    world_size = 1 if group is None else dist.get_world_size(group)
    chosen = resolve_backend(
        backend, world_size, device_type, deep_ep_available() if backend != "local" else False
    )
    if chosen == "local":
        return LocalDispatcher(num_experts // world_size)
    if chosen == "deepep" and not deep_ep_available():
        raise RuntimeError(INSTALL_HINT)
    if group is None:
        raise ValueError(f"moe backend {chosen!r} needs a process group")
    if chosen == "a2a":
        return AllToAllDispatcher(group, num_experts)
    return DeepEPDispatcher(
        group, num_experts, hidden_size, mode=deepep_mode, max_tokens_per_rank=max_tokens_per_rank
    )
