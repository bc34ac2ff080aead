"""Pick a TokenDispatcher by backend name: "local", "a2a", "symm", "nvlink", "deepep" or "auto".

`choose_backend` is the pure decision (unit-tested); `make_dispatcher` builds one dispatcher per MoE layer and
micro-batch, resolving "auto" once per process group (and running DeepEP's start-up self-check at most once).
auto = local on one rank; else deepep when importable, verified on GPUs and its self-check passes; else symm
on CUDA with NVSHMEM once verified on GPUs; else a2a (nvlink: only when requested until verified on GPUs).
The choice and why are printed once at start-up.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from moefleet.engine.distributed.a2a import AllToAllDispatcher
from moefleet.engine.distributed.deepep import INSTALL_HINT, DeepEPDispatcher, deep_ep_available
from moefleet.engine.distributed.nvlink import NVLINK_HINT, NvlinkDispatcher, nvlink_available
from moefleet.engine.distributed.symm import SYMM_HINT, SymmDispatcher, symm_available
from moefleet.engine.layers.token_dispatch import LocalDispatcher, TokenDispatcher

BACKENDS = ("local", "a2a", "symm", "nvlink", "deepep", "auto")
CLI_CHOICES = ("auto", "deepep", "nvlink", "symm", "a2a")  # `--moe-backend`
CUDA_ONLY = ("symm", "nvlink", "deepep")

# Backends `auto` may pick: only those whose GPU tests (tests/gpu/test_ep_backends_gpu.py) passed on 2 GPUs.
# See docs/distributed.md for the run that set each one.
VERIFIED_ON_GPU = {"symm": False, "nvlink": False, "deepep": False}


def choose_backend(
    requested: str,
    world_size: int,
    device_type: str,
    *,
    deepep_importable: bool,
    symm_usable: bool,
    deepep_self_check: Callable[[], tuple[bool, str]] | None = None,
    verified: dict[str, bool] | None = None,
    nvlink_usable: bool = False,
) -> tuple[str, str]:
    """Pure: (backend, why). `deepep_self_check` runs only when auto gets as far as DeepEP. auto's order:
    deepep, nvlink (`nvlink_usable`: CUDA peers within one node), symm, a2a; each only once verified."""
    verified = VERIFIED_ON_GPU if verified is None else verified
    if requested not in BACKENDS:
        raise ValueError(f"moe backend ({requested!r}) must be one of {BACKENDS}")
    if requested == "local":
        if world_size > 1:
            raise ValueError(
                f"moe backend 'local' keeps every expert on one rank but the expert-parallel group has "
                f"{world_size} ranks: use --moe-backend a2a (or symm, deepep, auto)"
            )
        return "local", "requested"
    if requested != "auto":
        if requested in CUDA_ONLY and device_type != "cuda":
            raise ValueError(
                f"moe backend {requested!r} needs CUDA GPUs but the device is {device_type!r}: use --moe-backend a2a"
            )
        return requested, "requested"
    if world_size == 1:
        return "local", "one rank: every expert is local"
    if device_type != "cuda":
        return "a2a", f"device {device_type!r}: all-to-all over torch.distributed is the portable backend"
    skipped: list[str] = []
    if not deepep_importable:
        skipped.append("deepep: deep_ep is not installed")
    elif not verified.get("deepep", False):
        skipped.append("deepep: not verified on GPUs yet")
    else:
        ok, detail = deepep_self_check() if deepep_self_check is not None else (False, "no self-check")
        if ok:
            return "deepep", f"deep_ep importable and its start-up self-check passed ({detail})"
        # DeepEP initialised NVSHMEM in this process with its own settings: torch's symm cannot share it.
        skipped += [
            f"deepep: start-up self-check failed ({detail})",
            "symm: DeepEP already holds NVSHMEM here",
        ]
        return "a2a", "; ".join(skipped)
    if not nvlink_usable:
        skipped.append("nvlink: the group is not one node's GPUs")
    elif not verified.get("nvlink", False):
        skipped.append("nvlink: not verified on GPUs yet")
    else:
        return "nvlink", "; ".join([*skipped, "nvlink: one node, peers' memory reachable over NVLink"])
    if not symm_usable:
        skipped.append("symm: no NVSHMEM symmetric memory in this torch build")
    elif not verified.get("symm", False):
        skipped.append("symm: not verified on GPUs yet")
    else:
        return "symm", "; ".join([*skipped, "symm: NVSHMEM symmetric memory available"])
    return "a2a", "; ".join(skipped)


def symm_reservation(
    top_k: int, dtype: torch.dtype | str | None, device: torch.device | None, micro_batches: int
) -> tuple[int, torch.dtype, torch.device, int] | None:
    """Pure: what symm allocates at start-up ((top_k, dtype, device, micro-batches)), or None when a size is
    unknown (then it allocates on the first dispatch). `dtype` may be the engine config's name ("bfloat16")."""
    if top_k <= 0 or dtype is None or device is None or device.type != "cuda":
        return None
    from moefleet.engine.loader import dtype_from_name

    if device.index is None:
        raise ValueError(f"symm needs an explicit CUDA device index, got {device}")
    return top_k, dtype_from_name(dtype), device, micro_batches


def _one_node(world_size: int) -> bool:
    """Whether the EP group is this node's GPUs (the launch's topology says one node and the GPUs are here)."""
    from moefleet.engine import topology

    return nvlink_available() and topology.current().nnodes == 1 and world_size <= torch.cuda.device_count()


_RESOLVED: dict[tuple[str, str], str] = {}


def _resolve(
    backend: str, group: dist.ProcessGroup | None, world_size: int, device_type: str, self_check: Callable
) -> str:
    key = ("" if group is None else group.group_name, backend)
    if key not in _RESOLVED:
        importable = deep_ep_available() if backend in ("auto", "deepep") else False
        chosen, why = choose_backend(
            backend,
            world_size,
            device_type,
            deepep_importable=importable,
            symm_usable=symm_available() if backend in ("auto", "symm") and device_type == "cuda" else False,
            deepep_self_check=self_check,
            nvlink_usable=backend == "auto" and device_type == "cuda" and _one_node(world_size),
        )
        if backend != "local":
            rank = dist.get_rank(group) if group is not None else 0
            print(
                f"moe backend: {chosen} (requested {backend}: {why}) [rank {rank}]",
                file=sys.stderr,
                flush=True,
            )
        _RESOLVED[key] = chosen
    return _RESOLVED[key]


def make_dispatcher(
    backend: str,
    group: dist.ProcessGroup | None,
    num_experts: int,
    *,
    hidden_size: int = 0,
    device_type: str = "cpu",
    deepep_mode: str = "auto",
    max_tokens_per_rank: int = 128,
    top_k: int = 0,
    dtype: torch.dtype | str | None = None,
    device: torch.device | None = None,
    micro_batches: int = 1,
    deepep_ll_fp8: bool = True,
    max_decode_tokens: int = 0,
) -> TokenDispatcher:
    """Build one dispatcher for one MoE layer (and one micro-batch). `num_experts` counts physical experts
        across the whole group; `group` may be None only for "local". `max_tokens_per_rank` bounds the tokens of
        one forward on one rank (the engine's max batched tokens): fixed-capacity backends size buffers from it.
        With `top_k`, `dtype` and `device` known, symm allocates its `micro_batches` workspaces now (before the KV
        cache is sized), else on the first dispatch. `deepep_ll_fp8`: DeepEP low-latency (and nvlink) dispatch in FP8 (FP8
        experts) or bf16 (bf16 experts). `max_decode_tokens`: the most sequences one rank decodes in a step (nvlink sizes
    its decode buffers from it; 0: 256)."""
    world_size = 1 if group is None else dist.get_world_size(group)

    def self_check() -> tuple[bool, str]:
        from moefleet.engine.distributed.deepep import self_check as deepep_self_check

        assert group is not None
        return deepep_self_check(group, num_experts, hidden_size, max_tokens_per_rank)

    chosen = _resolve(backend, group, world_size, device_type, self_check)
    if chosen == "local":
        return LocalDispatcher(num_experts // world_size)
    if chosen == "deepep" and not deep_ep_available():
        raise RuntimeError(INSTALL_HINT)
    if group is None:
        raise ValueError(f"moe backend {chosen!r} needs a process group")
    if chosen == "a2a":
        return AllToAllDispatcher(group, num_experts)
    if chosen == "nvlink":
        return _nvlink_dispatcher(
            group,
            num_experts,
            hidden_size,
            max_tokens_per_rank,
            top_k,
            dtype,
            device,
            micro_batches,
            max_decode_tokens,
            fp8_rows=deepep_ll_fp8,
        )
    if chosen == "symm":
        if not symm_available():
            raise RuntimeError(SYMM_HINT)
        reserve = symm_reservation(top_k, dtype, device, micro_batches)
        return SymmDispatcher(group, num_experts, hidden_size, max_tokens_per_rank, reserve=reserve)
    return DeepEPDispatcher(
        group,
        num_experts,
        hidden_size,
        mode=deepep_mode,
        max_tokens_per_rank=max_tokens_per_rank,
        ll_fp8=deepep_ll_fp8,
    )


def _nvlink_dispatcher(
    group: dist.ProcessGroup,
    num_experts: int,
    hidden_size: int,
    max_tokens_per_rank: int,
    top_k: int,
    dtype: torch.dtype | str | None,
    device: torch.device | None,
    micro_batches: int,
    max_decode_tokens: int,
    *,
    fp8_rows: bool,
) -> TokenDispatcher:
    """The nvlink dispatcher over this process's symmetric workspaces; prefill steps too large for its buffers
    go to a2a. Workspaces are reserved now when the sizes are known."""
    from moefleet.engine.distributed.nvlink import DECODE_TOKENS, workspace_pool

    if not nvlink_available():
        raise RuntimeError(NVLINK_HINT)
    world_size = dist.get_world_size(group)
    if not _one_node(world_size):  # the rule auto applies too
        raise ValueError(
            f"moe backend 'nvlink' writes into peers' memory over NVLink within one node, but the expert-parallel "
            f"group ({world_size} ranks) is not this node's GPUs ({torch.cuda.device_count()} here): use "
            "--moe-backend deepep (across nodes) or a2a"
        )
    if device is None or device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    reserve = symm_reservation(top_k, dtype, device, micro_batches)
    return NvlinkDispatcher(
        workspace_pool(group, device),
        num_experts,
        hidden_size,
        max_tokens_per_rank,
        decode_tokens=max_decode_tokens or DECODE_TOKENS,
        prefill=AllToAllDispatcher(group, num_experts),
        reserve=None if reserve is None else (reserve[0], reserve[1], reserve[3]),
        fp8_rows=fp8_rows,
    )
