"""Align MoE rows per expert on the device: the index tables the grouped GEMMs of `fused_moe` walk.

Given which local expert each row goes to, produce (vLLM/SGLang's `moe_align_block_size`, for shape):
- `sorted_ids` [max_padded]: row ids grouped by expert, each expert's group padded up to a multiple of
  `block_m` with the sentinel `num_rows` (a row that does not exist; kernels mask it);
- `expert_ids` [max_blocks]: the expert of each block of `block_m` sorted ids (-1 past the end);
- `num_padded` [1]: the padded total actually used (kernels exit early for blocks at or past it).
All three live in device memory and are sized for the worst case (every expert's last block ragged), so the
host never reads a count and the launch grid never depends on the routing: CUDA-graph capturable.

Two inputs are supported:
- `align_topk(topk_ids [T, K], ...)`: per-hit local expert ids, -1 for hits owned by another rank. Row id =
  flattened hit index t*K + k (the GEMM reads token row id // K). Positions within one expert's group are
  claimed with atomics, so their order is not fixed; every row's result is computed independently of its
  neighbours, so outputs are the same whatever the order.
- `align_grouped(counts [E], num_rows, ...)`: rows already grouped by expert (the dispatcher's layout),
  `counts` on the device. Order is the identity inside each group.
Shape legend: T tokens, K top-k, E local experts, N rows (T*K or dispatched rows), BM block_m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class AlignedRows:
    sorted_ids: torch.Tensor  # [max_padded] int32, sentinel num_rows for padding
    expert_ids: torch.Tensor  # [max_blocks] int32, -1 for unused blocks
    num_padded: torch.Tensor  # [1] int32
    num_rows: int  # rows the ids index into (the sentinel value)
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.shape[0]


def max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Worst-case sum over experts of ceil(count / block_m) * block_m, for any split of `num_rows`."""
    worst = num_rows + num_experts * (block_m - 1)
    worst = min(worst, num_rows * block_m)  # at most one block per row
    return triton.cdiv(max(worst, 0), block_m) * block_m


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_rows, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_rows, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    tl.atomic_add(counts_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=valid)


@triton.jit
def _offsets_kernel(
    counts_ptr,
    padded_offsets_ptr,  # [E + 1] out: start of each expert's padded group
    row_offsets_ptr,  # [E + 1] out: start of each expert's rows in grouped layout
    cursor_ptr,  # [E] out: = padded_offsets (atomics advance it in the scatter)
    expert_ids_ptr,
    num_padded_ptr,
    num_experts,
    max_blocks,
    block_m: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    e = tl.arange(0, BLOCK_E)
    emask = e < num_experts
    counts = tl.load(counts_ptr + e, mask=emask, other=0)
    padded = tl.cdiv(counts, block_m) * block_m
    padded_end = tl.cumsum(padded, 0)
    rows_end = tl.cumsum(counts, 0)
    padded_start = padded_end - padded
    tl.store(padded_offsets_ptr + e, padded_start, mask=emask)
    tl.store(row_offsets_ptr + e, rows_end - counts, mask=emask)
    tl.store(cursor_ptr + e, padded_start, mask=emask)
    total = tl.sum(padded, 0)
    tl.store(padded_offsets_ptr + num_experts, total)
    tl.store(row_offsets_ptr + num_experts, tl.sum(counts, 0))
    tl.store(num_padded_ptr, total)
    # expert of block b = number of experts whose padded group ends at or before b * block_m
    for start in range(0, max_blocks, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        first_row = b * block_m
        ends = tl.where(emask[None, :], padded_end[None, :], 2147483647)
        expert = tl.sum((ends <= first_row[:, None]).to(tl.int32), 1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(expert_ids_ptr + b, expert, mask=b < max_blocks)


@triton.jit
def _scatter_topk_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, num_rows, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_rows, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    pos = tl.atomic_add(cursor_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(sorted_ids_ptr + pos, offs.to(tl.int32), mask=valid)


@triton.jit
def _scatter_grouped_kernel(
    padded_offsets_ptr, row_offsets_ptr, sorted_ids_ptr, num_experts, BLOCK: tl.constexpr
):
    e = tl.program_id(0)
    row_start = tl.load(row_offsets_ptr + e)
    count = tl.load(row_offsets_ptr + e + 1) - row_start
    dst = tl.load(padded_offsets_ptr + e)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        tl.store(sorted_ids_ptr + dst + j, (row_start + j).to(tl.int32), mask=j < count)


def _tables(num_rows: int, num_experts: int, block_m: int, device: torch.device):
    max_padded = max_padded_rows(num_rows, num_experts, block_m)
    sorted_ids = torch.full((max_padded,), num_rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty((max_padded // block_m,), dtype=torch.int32, device=device)
    num_padded = torch.empty((1,), dtype=torch.int32, device=device)
    padded_offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=device)
    row_offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=device)
    cursor = torch.empty((max(num_experts, 1),), dtype=torch.int32, device=device)
    return sorted_ids, expert_ids, num_padded, padded_offsets, row_offsets, cursor


def _launch_offsets(
    counts, padded_offsets, row_offsets, cursor, expert_ids, num_padded, block_m: int
) -> None:
    num_experts = counts.shape[0]
    max_blocks = expert_ids.shape[0]
    _offsets_kernel[(1,)](
        counts,
        padded_offsets,
        row_offsets,
        cursor,
        expert_ids,
        num_padded,
        num_experts,
        max_blocks,
        block_m=block_m,
        BLOCK_E=max(triton.next_power_of_2(num_experts), 2),
        BLOCK_B=64,
    )


def align_topk(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRows:
    """topk_ids [T, K] (or [N]) local expert ids, -1 = not on this rank -> AlignedRows over the T*K hits."""
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    num_rows = ids.shape[0]
    sorted_ids, expert_ids, num_padded, padded_offsets, row_offsets, cursor = _tables(
        num_rows, num_experts, block_m, ids.device
    )
    counts = torch.zeros((max(num_experts, 1),), dtype=torch.int32, device=ids.device)[:num_experts]
    block = 256
    grid = (max(triton.cdiv(num_rows, block), 1),)
    if num_rows:
        _count_kernel[grid](ids, counts, num_rows, num_experts, BLOCK=block)
    _launch_offsets(counts, padded_offsets, row_offsets, cursor, expert_ids, num_padded, block_m)
    if num_rows:
        _scatter_topk_kernel[grid](ids, cursor, sorted_ids, num_rows, num_experts, BLOCK=block)
    return AlignedRows(sorted_ids, expert_ids, num_padded, num_rows, block_m)


def align_grouped(counts: torch.Tensor, num_rows: int, block_m: int) -> AlignedRows:
    """Rows [N] already grouped by expert with `counts` [E] (device, sums to N) -> AlignedRows."""
    num_experts = counts.shape[0]
    counts = counts.to(torch.int32).contiguous()
    sorted_ids, expert_ids, num_padded, padded_offsets, row_offsets, cursor = _tables(
        num_rows, num_experts, block_m, counts.device
    )
    _launch_offsets(counts, padded_offsets, row_offsets, cursor, expert_ids, num_padded, block_m)
    if num_experts and num_rows:
        _scatter_grouped_kernel[(num_experts,)](
            padded_offsets, row_offsets, sorted_ids, num_experts, BLOCK=128
        )
    return AlignedRows(sorted_ids, expert_ids, num_padded, num_rows, block_m)


def align_reference(
    expert_of_row: torch.Tensor, num_experts: int, block_m: int
) -> tuple[list[list[int]], list[int], int]:
    """Slow host reference: per expert its sorted row ids, the expert of each block, the padded total."""
    rows: list[list[int]] = [[] for _ in range(num_experts)]
    for i, e in enumerate(expert_of_row.reshape(-1).tolist()):
        if 0 <= e < num_experts:
            rows[e].append(i)
    blocks: list[int] = []
    for e, r in enumerate(rows):
        blocks += [e] * (-(-len(r) // block_m))
    return rows, blocks, len(blocks) * block_m
