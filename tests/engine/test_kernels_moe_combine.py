"""The MoE combine kernel (engine/kernels/moe_combine.py) under Triton's interpreter on CPU, against the torch
path it replaces on CUDA (`token_dispatch.unpermute_and_reduce`, the weighted index_add_ that matches
transformers): both dispatcher layouts (the host path that drops padding hits, the device path that keeps
them sorted last with a `valid` mask and garbage rows), top-k 1/2/8, widths that are not a block multiple,
no tokens, and a token whose every hit is padding."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.token_dispatch import (
    permute_by_expert,
    permute_by_expert_on_device,
    unpermute_and_reduce,
)


@pytest.fixture(scope="module")
def kernel():
    from moefleet.engine.kernels import moe_combine
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(moe_combine._combine_kernel, InterpretedFunction):
        pytest.skip("Triton kernels are compiled here (TRITON_INTERPRET unset): tests/gpu covers them")
    return moe_combine


def routing(
    tokens: int, top_k: int, experts: int, pad: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens else (
        torch.empty(0, top_k, dtype=torch.long))  # fmt: skip
    ids = torch.where(torch.rand(ids.shape, generator=g) < pad, torch.full_like(ids, -1), ids)
    return ids, torch.rand(ids.shape, generator=g)


@pytest.mark.parametrize("tokens,top_k,width", [(7, 1, 40), (13, 2, 64), (9, 8, 1100), (0, 8, 32)])
def test_host_layout_equals_index_add(kernel, tokens, top_k, width):
    ids, weights = routing(tokens, top_k, 10, pad=0.2, seed=tokens)
    if tokens:
        ids[0] = -1  # a token whose every hit is padding: exact zeros
    order, _, counts = permute_by_expert(ids, 10)
    rows = torch.randn(order.shape[0], width)
    want = unpermute_and_reduce(rows, order, weights, tokens)
    got = kernel.combine_rows(rows, kernel.hit_positions(order, ids.numel()), weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if tokens:
        assert not got[0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_layout_ignores_padding_rows(kernel, dtype):
    ids, weights = routing(11, 4, 6, pad=0.3, seed=3)
    order, _, _, valid = permute_by_expert_on_device(ids, 6)
    rows = torch.randn(order.shape[0], 72).to(dtype)
    rows[~valid] = float("nan")  # what padding rows may hold: never read
    want = unpermute_and_reduce(rows.float(), order, weights, 11, valid=valid)
    got = kernel.combine_rows(rows, kernel.hit_positions(order, ids.numel(), valid), weights)
    assert got.dtype == dtype and not got.isnan().any()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_hit_positions_invert_the_sort(kernel):
    ids, _ = routing(5, 3, 4, pad=0.0, seed=1)
    order, _, _ = permute_by_expert(ids, 4)
    pos = kernel.hit_positions(order, ids.numel())
    assert torch.equal(order[pos.long()], torch.arange(ids.numel()))


def test_bad_shapes_are_refused(kernel):
    with pytest.raises(ValueError, match="rows \\[N, D\\] and pos \\[T\\*K\\]"):
        kernel.combine_rows(torch.ones(4, 8), torch.zeros(3, dtype=torch.int32), torch.ones(2, 2))


@pytest.mark.parametrize(("tokens", "top_k", "width"), [(5, 3, 40), (1, 8, 1030), (0, 2, 8)])
def test_combine_hit_rows_weights_rows_in_hit_order_and_leaves_padding_out(kernel, tokens, top_k, width):
    g = torch.Generator().manual_seed(tokens + top_k)
    ids = torch.randint(0, 6, (tokens, top_k), generator=g)
    rows = torch.randn(tokens * top_k, width, generator=g)
    if tokens:
        ids[0, 0] = -1  # padding: its row holds garbage that must not leak
        rows[0] = float("nan")
    weights = torch.rand(tokens, top_k, generator=g)
    got = kernel.combine_hit_rows(rows, ids, weights)
    per_hit = torch.where((ids >= 0).reshape(-1, 1), rows, torch.zeros_like(rows)).view(tokens, top_k, width)
    want = (per_hit * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
