"""`fp8_cublas.padded_expert_loop` on CPU: each expert writes its rows rounded up to cuBLAS's row multiple
straight into the output; the padding rows (garbage here: NaN) must end up overwritten by the next expert or
zeroed, whatever the counts (empty experts, multiples of 4 or not, padding rows past the valid ones)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels.fp8_cublas import ROW_MULTIPLE, padded_expert_loop


def _fake_expert(rows: torch.Tensor, expert: int, out: torch.Tensor) -> None:
    assert out.shape[0] == -(-rows.shape[0] // ROW_MULTIPLE) * ROW_MULTIPLE and out.is_contiguous()
    out.fill_(float("nan"))  # what a padded GEMM leaves in its padding rows: anything
    out[: rows.shape[0]] = rows[:, : out.shape[1]] * 2 + expert


@pytest.mark.parametrize(
    "counts,padding",
    [([5, 0, 3, 8], 0), ([4, 4], 0), ([1, 1, 1], 3), ([0, 7, 0], 2), ([0, 0], 4), ([13], 1)],
)
def test_padding_rows_never_survive(counts, padding):
    torch.manual_seed(0)
    hidden = torch.randn(sum(counts) + padding, 6)
    got = padded_expert_loop(hidden, counts, _fake_expert)
    expected = torch.zeros(hidden.shape[0], 6)
    start = 0
    for expert, count in enumerate(counts):
        expected[start : start + count] = hidden[start : start + count] * 2 + expert
        start += count
    assert got.shape == hidden.shape
    assert torch.equal(got, expected)
