"""Expert-parallel dispatch/combine over torch.distributed all_to_all_single (gloo on CPU, NCCL on GPU).

Dispatch (every rank of the EP group calls it, also with T = 0 tokens):
  1. sort this rank's (token, expert) hits by physical expert id; experts are contiguous blocks per rank,
     so this also groups hits by destination rank;
  2. exchange counts [ranks, E_local] (rows per destination rank and local expert) - a blocking exchange,
     since the receive buffer must be sized before the rows can move;
  3. launch the row exchange (async work handle); `dispatch_finish` waits and regroups the received rows
     from (source rank, local expert) order into (local expert, source rank) order.
Combine reverses it: rows back to (source, expert) order, the reverse exchange with swapped splits, then
top-k weights are applied and hits summed per token on the rank that owns the token. The weights never
travel: they stay with the token's owner, which halves what a dispatch sends compared to shipping them.

Shape legend: T tokens, K top-k, D hidden, R ranks, E experts (physical, all ranks), L = E / R local
experts, S hits this rank sends (valid ids in topk_ids), N rows this rank receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from moefleet.engine.distributed.groups import check_experts_divisible
from moefleet.engine.layers.token_dispatch import DispatchedTokens, permute_by_expert, unpermute_and_reduce


@dataclass
class SendPlan:
    """How this rank's hits leave: which token each sent row copies, and how many go to each rank/expert."""

    order: torch.Tensor  # [S] indices into the flattened [T*K] hits, sorted by physical expert
    token_index: torch.Tensor  # [S] source token of each sent row
    counts: torch.Tensor  # [R, L] rows for (destination rank, its local expert)


def plan_send(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> SendPlan:
    """Pure: group this rank's hits by destination rank and local expert. Ids < 0 (padding) are dropped."""
    check_experts_divisible(num_experts, world_size)
    if topk_ids.numel() and int(topk_ids.max()) >= num_experts:
        raise ValueError(
            f"topk_ids holds expert id {int(topk_ids.max())} but there are {num_experts} experts"
        )
    order, token_index, counts = permute_by_expert(topk_ids, num_experts)
    return SendPlan(order, token_index, counts.view(world_size, num_experts // world_size))


def regroup_by_expert(recv_counts: torch.Tensor) -> torch.Tensor:
    """Pure: permutation taking rows received in (source rank, local expert) order to (local expert, source)
    order. `recv_counts` [R, L]: rows from source s for local expert e. Returns indices [N] such that
    `received[perm]` is grouped by local expert (sources in rank order within an expert)."""
    num_sources, num_local = recv_counts.shape
    flat = recv_counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # start of block (s, e) in received order
    # Visit the blocks expert-major: (e, s) for e in experts for s in sources.
    device = recv_counts.device
    by_expert = (
        torch.arange(num_sources * num_local, device=device).view(num_sources, num_local).t().reshape(-1)
    )
    lengths = flat[by_expert]
    block_starts = starts[by_expert]
    total = int(flat.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    offsets = torch.arange(total, device=device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    return torch.repeat_interleave(block_starts, lengths) + offsets


@dataclass
class _A2AHandle:
    plan: SendPlan
    topk_weights: torch.Tensor
    num_tokens: int
    send_splits: list[int]  # rows to each rank (dispatch direction)
    recv_splits: list[int]  # rows from each rank
    regroup: torch.Tensor  # [N] received order -> expert-grouped order


@dataclass
class _PendingDispatch:
    work: Any  # torch.distributed Work or None when already complete
    received: torch.Tensor
    handle: _A2AHandle
    tokens_per_expert: list[int]
    # Read by the collective: held until the handle dies (two-batch overlap frees blocks across streams)
    send_rows: torch.Tensor | None = None


@dataclass
class _PendingCombine:
    work: Any
    returned: torch.Tensor  # [S, D] this rank's hits, in send order
    handle: _A2AHandle
    sent: torch.Tensor | None = None  # read by the collective: held until the handle dies


class AllToAllDispatcher:
    """TokenDispatcher over an expert-parallel process group using all_to_all_single.

    `topk_ids` are physical expert ids in [0, num_experts); rank r owns the contiguous block
    [r * L, (r + 1) * L) (`ParallelLayout.local_experts`). One object per micro-batch: a dispatch must be
    combined before the same object dispatches again.
    """

    # Two-batch overlap (tbo_streams.py): the collectives are issued from a comm stream (NCCL orders its own
    # stream after it).
    TBO_OVERLAP = "comm_stream"
    # Decode steps read the receive counts on the host: not replayable from a CUDA graph.
    SYNC_FREE_DECODE = False

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.world_size = dist.get_world_size(group)
        check_experts_divisible(num_experts, self.world_size)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        plan = plan_send(topk_ids, self.num_experts, self.world_size)
        send_counts = plan.counts.to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        # Counts first: a host sync, because the row buffer's size depends on them.
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        # Every split size from one device->host copy (on CUDA each .tolist() is its own sync).
        host_send, host_recv = torch.stack((send_counts, recv_counts)).cpu()
        send_splits = host_send.sum(1).tolist()
        recv_splits = host_recv.sum(1).tolist()
        send_rows = hidden[plan.token_index].contiguous()  # [S, D]
        received = hidden.new_empty(sum(recv_splits), hidden.shape[1])  # [N, D]
        work = dist.all_to_all_single(
            received, send_rows, recv_splits, send_splits, group=self.group, async_op=True
        )
        handle = _A2AHandle(
            plan, topk_weights, hidden.shape[0], send_splits, recv_splits, regroup_by_expert(recv_counts)
        )
        return _PendingDispatch(work, received, handle, host_recv.sum(0).tolist(), send_rows)

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        p: _PendingDispatch = pending
        if p.work is not None:
            p.work.wait()
        return DispatchedTokens(p.received[p.handle.regroup], p.tokens_per_expert, p.handle)

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        h: _A2AHandle = dispatched.handle
        by_source = torch.empty_like(expert_output)
        by_source[h.regroup] = expert_output  # undo the regroup: back to (source rank, expert) order
        returned = expert_output.new_empty(sum(h.send_splits), expert_output.shape[1])
        sent = by_source.contiguous()
        work = dist.all_to_all_single(
            returned, sent, h.send_splits, h.recv_splits, group=self.group, async_op=True
        )
        return _PendingCombine(work, returned, h, sent)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        p: _PendingCombine = pending
        if p.work is not None:
            p.work.wait()
        h = p.handle
        return unpermute_and_reduce(p.returned, h.plan.order, h.topk_weights, h.num_tokens)
