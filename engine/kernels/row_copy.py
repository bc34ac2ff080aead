"""Row gather / scatter with the number of valid rows read from device memory (no host synchronisation).

    copy_rows(src, dst, index, n_valid, scatter=False)
      gather  (scatter=False): dst[r, :C] = src[index[r], :C]  for r < n_valid
      scatter (scatter=True):  dst[index[r], :C] = src[r, :C]  for r < n_valid

C = min(src.shape[1], dst.shape[1]): one side may be wider (the symmetric-memory dispatcher packs an expert
id after the hidden columns); the other columns are left as they are. The launch grid depends only on `index.shape[0]`
(the static capacity); rows at or past `n_valid` (a one-element device tensor) exit at once, so copying
costs what the routing actually moved and the launch is CUDA-graph capturable. This is the reorder between
the symmetric buffers' rank-major layout and the expert-major layout of the fused MoE kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows_kernel(
    src_ptr,
    dst_ptr,
    index_ptr,
    n_valid_ptr,
    cols,
    stride_src,
    stride_dst,
    SCATTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    n_valid = tl.load(n_valid_ptr)
    if row < n_valid:
        other = tl.load(index_ptr + row).to(tl.int64)
        if SCATTER:
            src_row = row.to(tl.int64)
            dst_row = other
        else:
            src_row = other
            dst_row = row.to(tl.int64)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            values = tl.load(src_ptr + src_row * stride_src + offs, mask=mask)
            tl.store(dst_ptr + dst_row * stride_dst + offs, values, mask=mask)


def copy_rows(
    src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, n_valid: torch.Tensor, scatter: bool = False
) -> torch.Tensor:
    """Gather (or scatter) rows by `index` [R] for the first `n_valid` (device scalar) entries; returns dst."""
    if src.dim() != 2 or dst.dim() != 2 or src.stride(1) != 1 or dst.stride(1) != 1:
        raise ValueError("copy_rows needs 2-D src and dst with contiguous rows")
    if src.dtype != dst.dtype:
        raise ValueError(f"copy_rows: src dtype {src.dtype} != dst dtype {dst.dtype}")
    cols = min(src.shape[1], dst.shape[1])
    rows = index.shape[0]
    if rows == 0 or cols == 0:
        return dst
    block = min(triton.next_power_of_2(cols), 1024)
    _copy_rows_kernel[(rows,)](
        src,
        dst,
        index,
        n_valid.reshape(1),
        cols,
        src.stride(0),
        dst.stride(0),
        SCATTER=scatter,
        BLOCK=block,
    )
    return dst


def copy_rows_reference(
    src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, n_valid: int, scatter: bool = False
) -> torch.Tensor:
    """Slow torch reference of `copy_rows` (the tests' oracle)."""
    out = dst.clone()
    cols = min(src.shape[1], dst.shape[1])
    for r in range(n_valid):
        i = int(index[r])
        if scatter:
            out[i, :cols] = src[r, :cols]
        else:
            out[r, :cols] = src[i, :cols]
    return out
