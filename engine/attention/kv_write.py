"""Write a step's new K/V (or MLA latent) rows into the paged cache: cache_flat[slot[t]] = rows[t], slot < 0
skipped. A Triton kernel (one program per row; no host sync, so a decode step with it can be captured in a
CUDA graph, padded rows carrying slot -1) and a torch reference (`nonzero` + index_put, syncs once).
Shape legend: T rows, W values per row (Hk * D for GQA, R + Dr for MLA), S cache slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_rows_reference(cache_flat: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """cache_flat [S, W], rows [T, W], slots [T] int64 (-1 = skip)."""
    keep = torch.nonzero(slots >= 0).squeeze(1)
    cache_flat[slots[keep]] = rows[keep].to(cache_flat.dtype)


def store_rows(cache_flat: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Triton version of `store_rows_reference` (same arguments). Rows and cache rows may be strided views
    as long as each row is contiguous."""
    num_rows, width = rows.shape
    if num_rows == 0:
        return
    if cache_flat.shape[1] != width or cache_flat.stride(1) != 1 or rows.stride(1) != 1:
        raise ValueError(
            f"store_rows wants contiguous rows of equal width: cache {tuple(cache_flat.shape)} stride "
            f"{cache_flat.stride()}, rows {tuple(rows.shape)} stride {rows.stride()}"
        )
    block = min(1024, triton.next_power_of_2(width))
    _store_rows_kernel[(num_rows,)](
        rows, cache_flat, slots, rows.stride(0), cache_flat.stride(0), width, BLOCK=block
    )


@triton.jit
def _store_rows_kernel(src_ptr, dst_ptr, slot_ptr, src_stride, dst_stride, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    limit = tl.where(slot >= 0, width, 0)  # a negative slot writes nothing
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < limit
        values = tl.load(src_ptr + row.to(tl.int64) * src_stride + offs, mask=mask)
        tl.store(dst_ptr + slot * dst_stride + offs, values.to(dst_ptr.dtype.element_ty), mask=mask)
