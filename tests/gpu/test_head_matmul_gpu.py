"""The per-head matmul (MLA weight absorption) on a GPU against a float32 einsum, bf16 and fp32."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 77, 256])
def test_head_matmul_matches_einsum(dtype, tokens):
    from moefleet.engine.kernels.head_matmul import head_matmul

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    w_kv = torch.randn(128, 256, 512, device="cuda", generator=gen).to(dtype) * 0.05
    w_uk, w_uv = w_kv.split([128, 128], dim=1)
    q = torch.randn(tokens, 128, 192, device="cuda", generator=gen).to(dtype)[:, :, :128]
    lat = head_matmul(q, w_uk)
    ref = torch.einsum("thn,hnr->thr", q.float(), w_uk.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(lat.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    out = head_matmul(lat, w_uv.transpose(1, 2))
    ref_out = torch.einsum("thr,hvr->thv", lat.float(), w_uv.float())
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol * ref_out.abs().max().item())
