"""Triton kernels of the `nvlink` expert-parallel dispatcher: rows written straight into peers' memory.

Every rank holds the same buffers at the same shapes (torch symmetric memory); a kernel reaches a peer's copy
through a pointer table [W] int64 (entry r = rank r's base address, this rank's own entry included). Nothing
here synchronises with the host, so a decode step with these kernels is CUDA-graph capturable.

dispatch_rows   one program per (token, k) hit of this rank: reserve a slot in the destination expert's
                receive rows (an atomic add on that rank's per-expert counter, system scope), copy the token's
                row there, and record where it came from (rank * hits_per_rank + hit) beside it.
return_rows     one program per (local expert, row group): each valid received row (row < count) is copied
                back to its source rank's combine buffer at the hit's position.

The receive rows are the masked layout [L, C, D] (local expert e's rows are [e, :count[e]]) that the masked
fused-MoE kernel reads as they are. A hit whose slot would pass the capacity is dropped and counted in
`dropped` (impossible when C = W x max tokens per rank and a token never repeats an expert).
Shape legend: T tokens, K top-k, D hidden, W ranks, L local experts, C capacity rows per local expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 1024  # columns per copy step: 8 bf16 (16 bytes) per thread at 4 warps


@triton.jit
def _dispatch_kernel(
    x_ptr,
    x_stride,
    ids_ptr,
    recv_x_table,
    recv_src_table,
    counter_table,
    dropped_ptr,
    hit_base,
    cols,
    cap,
    scale_ptr,
    recv_scale_table,
    groups,
    TOP_K: tl.constexpr,
    LOCAL: tl.constexpr,
    BLOCK: tl.constexpr,
    SCALES: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    hit = tl.program_id(0)
    expert = tl.load(ids_ptr + hit)
    if expert >= 0:
        dst = expert // LOCAL
        local = expert % LOCAL
        counters = tl.load(counter_table + dst).to(tl.pointer_type(tl.int32))
        slot = tl.atomic_add(counters + local, 1, sem="relaxed", scope="sys")
        if slot < cap:
            row = (local * cap + slot).to(tl.int64)
            recv_src = tl.load(recv_src_table + dst).to(tl.pointer_type(tl.int32))
            tl.store(recv_src + row, hit_base + hit)
            recv_x = tl.load(recv_x_table + dst).to(tl.pointer_type(x_ptr.dtype.element_ty))
            src = x_ptr + (hit // TOP_K).to(tl.int64) * x_stride
            for start in range(0, cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < cols
                tl.store(recv_x + row * cols + offs, tl.load(src + offs, mask=mask), mask=mask)
            if SCALES:  # FP8 rows: their per-group scales beside them, [L, C, G]
                recv_scale = tl.load(recv_scale_table + dst).to(tl.pointer_type(tl.float32))
                g = tl.arange(0, BLOCK_G)
                scales = tl.load(scale_ptr + (hit // TOP_K).to(tl.int64) * groups + g, mask=g < groups)
                tl.store(recv_scale + row * groups + g, scales, mask=g < groups)
        else:
            tl.atomic_add(dropped_ptr, 1)


def dispatch_rows(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    recv_x_table: torch.Tensor,
    recv_src_table: torch.Tensor,
    counter_table: torch.Tensor,
    dropped: torch.Tensor,
    *,
    hit_base: int,
    num_local_experts: int,
    capacity: int,
    scales: torch.Tensor | None = None,
    recv_scale_table: torch.Tensor | None = None,
) -> None:
    """x [T, D] rows, topk_ids [T, K] physical experts (< 0: padding, skipped) -> each hit's row lands in
    rank (id // L)'s receive rows [L, C, D] at local expert id % L, slot from that rank's counter [L]; its
    source (hit_base + t * K + k) in that rank's [L, C] int32. Tables: [W] int64 base addresses. With
    `scales` [T, G] float32 (FP8 rows), each row's scales go to that rank's [L, C, G] (`recv_scale_table`)."""
    tokens, top_k = topk_ids.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if tokens == 0:
        return
    if (scales is None) != (recv_scale_table is None):
        raise ValueError("dispatch_rows: scales and recv_scale_table come together (FP8 rows)")
    groups = 0 if scales is None else scales.shape[1]
    if scales is not None:
        scales = scales.contiguous()
    _dispatch_kernel[(tokens * top_k,)](
        x,
        x.stride(0),
        topk_ids.contiguous(),
        recv_x_table,
        recv_src_table,
        counter_table,
        dropped,
        hit_base,
        x.shape[1],
        capacity,
        dropped if scales is None else scales,  # (unused without scales)
        counter_table if recv_scale_table is None else recv_scale_table,
        groups,
        TOP_K=top_k,
        LOCAL=num_local_experts,
        BLOCK=min(BLOCK_D, triton.next_power_of_2(x.shape[1])),
        SCALES=scales is not None,
        BLOCK_G=triton.next_power_of_2(max(groups, 1)),
        num_warps=4,
    )


@triton.jit
def _return_kernel(
    y_ptr,
    counts_ptr,
    recv_src_ptr,
    back_table,
    hits_per_rank,
    cols,
    cap,
    BLOCK: tl.constexpr,
):
    local = tl.program_id(0)
    group = tl.program_id(1)
    groups = tl.num_programs(1)
    count = tl.minimum(tl.load(counts_ptr + local), cap)
    for slot in range(group, count, groups):
        row = (local * cap + slot).to(tl.int64)
        source = tl.load(recv_src_ptr + row)
        rank = source // hits_per_rank
        hit = (source % hits_per_rank).to(tl.int64)
        back = tl.load(back_table + rank).to(tl.pointer_type(y_ptr.dtype.element_ty))
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            tl.store(back + hit * cols + offs, tl.load(y_ptr + row * cols + offs, mask=mask), mask=mask)


def return_rows(
    expert_output: torch.Tensor,
    counts: torch.Tensor,
    recv_src: torch.Tensor,
    back_table: torch.Tensor,
    *,
    hits_per_rank: int,
    row_groups: int,
) -> None:
    """expert_output [L, C, D] (rows [e, :counts[e]] valid) -> each valid row to its source rank's combine
    buffer [hits_per_rank, D] (same dtype) at the hit recorded in recv_src [L, C]. `row_groups` programs per
    expert (each loops over every row_groups-th row)."""
    local, cap, cols = expert_output.shape
    if local == 0 or cols == 0:
        return
    y = expert_output.contiguous()
    _return_kernel[(local, max(1, min(row_groups, cap)))](
        y,
        counts,
        recv_src,
        back_table,
        hits_per_rank,
        cols,
        cap,
        BLOCK=min(BLOCK_D, triton.next_power_of_2(cols)),
        num_warps=4,
    )


@triton.jit
def _take_counts_kernel(counters_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        mask = start + offs < n
        tl.store(counts_ptr + start + offs, tl.load(counters_ptr + start + offs, mask=mask), mask=mask)
        tl.store(counters_ptr + start + offs, tl.zeros([BLOCK], tl.int32), mask=mask)


def take_counts(counters: torch.Tensor) -> torch.Tensor:
    """counts = counters, counters = 0 (one launch): the received rows per local expert, and the counters
    ready for the next dispatch."""
    counts = torch.empty_like(counters)
    if counters.numel():
        _take_counts_kernel[(1,)](
            counters, counts, counters.numel(), BLOCK=min(1024, triton.next_power_of_2(counters.numel()))
        )
    return counts


def dispatch_reference(
    x: torch.Tensor, topk_ids: torch.Tensor, world_size: int, num_local_experts: int
) -> list[list[list[tuple[int, torch.Tensor]]]]:
    """Pure torch, for tests: per destination rank, per local expert, the (hit, row) pairs it receives from
    this rank (in hit order; the kernel's slot order may differ)."""
    out: list[list[list[tuple[int, torch.Tensor]]]] = [
        [[] for _ in range(num_local_experts)] for _ in range(world_size)
    ]
    top_k = topk_ids.shape[1]
    for hit, expert in enumerate(topk_ids.reshape(-1).tolist()):
        if expert >= 0:
            out[expert // num_local_experts][expert % num_local_experts].append((hit, x[hit // top_k]))
    return out
