"""On an NVIDIA GPU: the MoE combine kernel (engine/kernels/moe_combine.py) against a float64 reference from the
formula, at DeepSeek-V3 width (7168) and a tiny width, bf16 and float32, with padding hits, the device
dispatcher's layout, and no tokens; and `unpermute_and_reduce` on CUDA (which now runs it) against its CPU
torch path. Skipped without CUDA (CI)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.token_dispatch import permute_by_expert_on_device, unpermute_and_reduce

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def reference(
    rows: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    tokens, top_k = weights.shape
    out = torch.zeros(tokens, rows.shape[1], dtype=torch.float64)
    for i, hit in enumerate(order.tolist()):
        if valid[i]:
            out[hit // top_k] += float(weights.flatten()[hit]) * rows[i].double()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,top_k,width,experts", [(300, 8, 7168, 64), (17, 2, 24, 5), (0, 8, 7168, 8)])
def test_combine_on_gpu_matches_the_formula(dtype, tokens, top_k, width, experts):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.1] = -1
    weights = torch.rand(tokens, top_k, generator=g)
    order, _, _, valid = permute_by_expert_on_device(ids.cuda(), experts)
    rows = torch.randn(order.shape[0], width, generator=g).to(dtype).cuda()
    rows[~valid] = float("nan")  # padding rows are never read
    got = unpermute_and_reduce(rows, order, weights.cuda(), tokens, valid=valid)
    want = reference(rows.cpu(), order.cpu(), valid.cpu(), weights)
    assert got.dtype == dtype and got.shape == (tokens, width) and not got.isnan().any()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
