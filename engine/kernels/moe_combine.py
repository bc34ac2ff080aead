"""The MoE combine as one gather-reduce kernel: out[t] = sum_k w[t, k] * rows[pos[t, k]].

After the experts, every (token, expert) hit's output sits in `rows` in the dispatcher's order (sorted by
expert). The torch path (`token_dispatch.unpermute_and_reduce`) multiplies every row by its weight, masks
padding with `torch.where`, zero-fills the output and `index_add_`s the rows back: four full passes over the
rows plus atomics (in bf16 on CUDA), ~14 ms per DeepSeek-V3 MoE layer at 131k rows on an H200
(docs/benchmarks.md). Here each program owns one token and a column block: it reads that token's K rows once,
accumulates in float32 and writes the token once. No atomics (deterministic), no zero fill, padding hits
(pos < 0) are skipped, and the grid depends only on the static token count (CUDA-graph capturable).

    hit_positions(order, num_hits, valid) -> pos [T*K] int32   (inverse of the dispatcher's sort)
    combine_rows(rows [N, D], pos [T*K], topk_weights [T, K]) -> [T, D] in rows' dtype
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    rows_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    cols,
    stride_row,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HIT_ROWS: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < cols
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pos = tl.load(pos_ptr + token * TOP_K + k).to(tl.int64)
        if (
            HIT_ROWS
        ):  # pos_ptr holds the hits' expert ids: hit (t, k) is row t * K + k, padding (< 0) left out
            pos = tl.where(pos >= 0, token * TOP_K + k, -1)
        weight = tl.load(w_ptr + token * TOP_K + k).to(tl.float32)
        if pos >= 0:
            row = tl.load(rows_ptr + pos * stride_row + offs, mask=mask, other=0.0)
            acc += weight * row.to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def hit_positions(order: torch.Tensor, num_hits: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """pos [num_hits] int32: where each flattened (token, k) hit landed in the sorted rows (`order[i]` is the
    hit at sorted row i), -1 for hits that have no row (dropped padding, or sorted rows whose `valid` is
    False). No host synchronisation."""
    sorted_rows = torch.arange(order.shape[0], dtype=torch.int32, device=order.device)
    if valid is not None:
        sorted_rows = torch.where(valid, sorted_rows, torch.full_like(sorted_rows, -1))
    pos = torch.full((num_hits,), -1, dtype=torch.int32, device=order.device)
    return pos.scatter_(0, order.to(torch.int64), sorted_rows)


def combine_hit_rows(rows: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out [T, D]: out[t] = sum over k of topk_weights[t, k] * rows[t * K + k], hits with topk_ids < 0 left out
    (rows in hit order, e.g. written back by the nvlink dispatcher); one launch, float32 accumulation."""
    return combine_rows(rows, topk_ids.reshape(-1), topk_weights, hit_rows=True)


def combine_rows(
    rows: torch.Tensor, pos: torch.Tensor, topk_weights: torch.Tensor, *, hit_rows: bool = False
) -> torch.Tensor:
    """out [T, D] (rows' dtype): out[t] = sum over k of topk_weights[t, k] * rows[pos[t * K + k]], hits with
    pos < 0 left out; float32 accumulation."""
    tokens, top_k = topk_weights.shape
    if rows.dim() != 2 or pos.shape != (tokens * top_k,):
        raise ValueError(
            f"combine_rows wants rows [N, D] and pos [T*K]; got {tuple(rows.shape)}, {tuple(pos.shape)} "
            f"for weights {tuple(topk_weights.shape)}"
        )
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    cols = rows.shape[1]
    out = torch.empty((tokens, cols), dtype=rows.dtype, device=rows.device)
    if tokens == 0 or cols == 0:
        return out
    block_d = min(1024, triton.next_power_of_2(cols))
    _combine_kernel[(tokens, triton.cdiv(cols, block_d))](
        rows,
        pos.contiguous(),
        topk_weights.contiguous(),
        out,
        cols,
        rows.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_D=block_d,
        HIT_ROWS=hit_rows,
        num_warps=4,
    )
    return out
