"""DeepEP-backed dispatcher (https://github.com/deepseek-ai/DeepEP, V1 `deep_ep.Buffer` API).

UNTESTED: it needs NVIDIA GPUs with NVLink/RDMA and a source build of DeepEP; nothing here runs in CI.
It follows DeepEP's documented examples and adapts their outputs to the `TokenDispatcher` contract:

- normal mode (prefill): `get_dispatch_layout` + `dispatch` deliver each token ONCE per destination rank,
  with its top-k ids translated to local expert ids (-1 where the expert lives elsewhere) and its weights.
  We expand those into one row per (token, local expert) hit grouped by local expert, and on combine apply
  the weights locally and sum per received token before `combine` sums across ranks (normal-mode combine
  does not apply weights). Dispatch blocks the CPU until counts arrive (DeepEP's own host sync).
- low-latency mode (decode): `low_latency_dispatch` fills a fixed [L, max_tokens * R, D] buffer with
  per-expert counts; we flatten the valid rows (a host sync on the counts, so this path is not CUDA-graph
  safe yet) and scatter expert outputs back into that layout for `low_latency_combine`, which applies the
  top-k weights itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from moefleet.engine.distributed.groups import check_experts_divisible
from moefleet.engine.layers.token_dispatch import DispatchedTokens, permute_by_expert

INSTALL_HINT = (
    "the 'deepep' MoE backend needs the deep_ep module: pip install deep_ep from source "
    "(https://github.com/deepseek-ai/DeepEP, needs NVSHMEM and CUDA GPUs; the PyPI sdist does not build); "
    "or use --moe-backend a2a"
)


def deep_ep_available() -> bool:
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


def _import_buffer() -> Any:
    try:
        from deep_ep import Buffer
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return Buffer


def expand_hits(
    recv_topk_idx: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pure: received tokens [M, K] with local expert ids (-1 = not here) -> (order [N] into the flattened
    [M*K] hits grouped by local expert, token_index [N] into the M received tokens, rows per local expert)."""
    order, token_index, counts = permute_by_expert(recv_topk_idx, num_local_experts)
    return order, token_index, counts.tolist()


@dataclass
class _NormalHandle:
    deep_handle: Any
    order: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_received: int


@dataclass
class _LowLatencyHandle:
    deep_handle: Any
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    counts: list[int]
    packed_shape: torch.Size


class DeepEPDispatcher:
    """TokenDispatcher on DeepEP. `mode` is "normal" (prefill) or "low_latency" (decode)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_experts: int,
        hidden_size: int,
        mode: str = "normal",
        max_tokens_per_rank: int = 128,
        dtype_bytes: int = 2,
    ):
        if mode not in ("normal", "low_latency"):
            raise ValueError(f"DeepEP mode ({mode!r}) must be 'normal' or 'low_latency'")
        buffer_cls = _import_buffer()
        world_size = group.size()
        check_experts_divisible(num_experts, world_size)
        self.group, self.mode, self.num_experts = group, mode, num_experts
        self.num_local_experts = num_experts // world_size
        self.max_tokens_per_rank = max_tokens_per_rank
        if mode == "normal":
            hidden_bytes = hidden_size * max(dtype_bytes, 2)
            nvl_bytes = rdma_bytes = 0
            for config in (
                buffer_cls.get_dispatch_config(world_size),
                buffer_cls.get_combine_config(world_size),
            ):
                nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, world_size), nvl_bytes)
                rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, world_size), rdma_bytes)
            self.buffer = buffer_cls(group, nvl_bytes, rdma_bytes)
        else:
            rdma_bytes = buffer_cls.get_low_latency_rdma_size_hint(
                max_tokens_per_rank, hidden_size, world_size, num_experts
            )
            self.buffer = buffer_cls(
                group, 0, rdma_bytes, low_latency_mode=True, num_qps_per_rank=self.num_local_experts
            )

    # -- normal mode ----------------------------------------------------------------------------------
    def _normal_dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> Any:
        topk_idx = topk_ids.to(torch.int64)
        per_rank, per_rdma_rank, per_expert, in_rank, event = self.buffer.get_dispatch_layout(
            topk_idx, self.num_experts
        )
        recv_x, recv_idx, recv_weights, _, deep_handle, _ = self.buffer.dispatch(
            hidden,
            topk_idx=topk_idx,
            topk_weights=topk_weights.float(),  # DeepEP takes float32 weights
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            previous_event=event,
        )
        order, token_index, counts = expand_hits(recv_idx, self.num_local_experts)
        handle = _NormalHandle(deep_handle, order, recv_weights, recv_x.shape[0])
        return DispatchedTokens(recv_x[token_index], counts, handle)

    def _normal_combine(self, expert_output: torch.Tensor, h: _NormalHandle) -> torch.Tensor:
        # Weight and sum hits per received token here; DeepEP's combine then sums across ranks.
        top_k = h.recv_topk_weights.shape[1]
        weights = h.recv_topk_weights.reshape(-1)[h.order].to(expert_output.dtype).unsqueeze(1)
        per_token = expert_output.new_zeros(h.num_received, expert_output.shape[1])
        per_token.index_add_(0, h.order // top_k, expert_output * weights)
        combined, _, _ = self.buffer.combine(per_token, h.deep_handle)
        return combined

    # -- low-latency mode -----------------------------------------------------------------------------
    def _ll_dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Any:
        topk_idx = topk_ids.to(torch.int64)
        packed, packed_count, deep_handle, _, _ = self.buffer.low_latency_dispatch(
            hidden, topk_idx, self.max_tokens_per_rank, self.num_experts, use_fp8=False
        )
        counts = packed_count.tolist()  # host sync: not CUDA-graph safe (see module docstring)
        rows = torch.cat([packed[e, :c] for e, c in enumerate(counts)]) if sum(counts) else packed[0, :0]
        handle = _LowLatencyHandle(deep_handle, topk_idx, topk_weights, counts, packed.shape)
        return DispatchedTokens(rows, counts, handle)

    def _ll_combine(self, expert_output: torch.Tensor, h: _LowLatencyHandle) -> torch.Tensor:
        packed = expert_output.new_zeros(h.packed_shape)
        start = 0
        for e, c in enumerate(h.counts):
            packed[e, :c] = expert_output[start : start + c]
            start += c
        combined, _, _ = self.buffer.low_latency_combine(
            packed, h.topk_ids, h.topk_weights.float(), h.deep_handle
        )
        return combined

    # -- TokenDispatcher ------------------------------------------------------------------------------
    def dispatch_start(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Any:
        if self.mode == "normal":
            return self._normal_dispatch(hidden, topk_ids, topk_weights)
        return self._ll_dispatch(hidden, topk_ids, topk_weights)

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        return pending

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        if self.mode == "normal":
            return self._normal_combine(expert_output, dispatched.handle)
        return self._ll_combine(expert_output, dispatched.handle)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        return pending
