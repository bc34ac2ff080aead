"""engine/kernels/head_matmul.py under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) against
einsum (float32, small shapes)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels.head_matmul import head_matmul


@pytest.mark.parametrize("tokens", [0, 1, 5, 37])
def test_head_matmul_equals_einsum_on_split_views(tokens):
    gen = torch.Generator().manual_seed(tokens)
    heads, dn, dv, rank = 3, 24, 16, 40
    w_kv = torch.randn(heads, dn + dv, rank, generator=gen)  # kv_b_proj's weight as [H, Dn + Dv, R]
    w_uk, w_uv = w_kv.split([dn, dv], dim=1)  # strided views, as MLA uses them
    q = torch.randn(tokens, heads, dn + 8, generator=gen)[:, :, :dn]  # a strided query (split of a wider row)
    latent = head_matmul(q, w_uk)  # [T, H, R]
    torch.testing.assert_close(latent, torch.einsum("thn,hnr->thr", q, w_uk), rtol=1e-5, atol=1e-5)
    values = head_matmul(latent, w_uv.transpose(1, 2))  # [T, H, Dv]
    torch.testing.assert_close(values, torch.einsum("thr,hvr->thv", latent, w_uv), rtol=1e-5, atol=1e-4)


def test_head_matmul_writes_into_out_and_checks_shapes():
    x = torch.randn(4, 2, 16)
    w = torch.randn(2, 16, 8)
    out = torch.full((4, 2, 8), float("nan"))
    assert head_matmul(x, w, out=out) is out
    torch.testing.assert_close(out, torch.einsum("thk,hkn->thn", x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x \[T, H, K\] and w \[H, K, N\]"):
        head_matmul(x, torch.randn(3, 16, 8))
