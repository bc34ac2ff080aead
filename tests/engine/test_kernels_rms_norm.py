"""The fused RMSNorm kernel (engine/kernels/rms_norm.py) against the torch formula (`rms_norm_reference`,
Hugging Face's), under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 where there is no
GPU). float32 agrees to rounding (the row sum runs in another order). bfloat16: the interpreter's float32 ->
bfloat16 cast truncates where the GPU's rounds to nearest, so here the normalised row may sit one bf16 ulp
(2^-7 relative) away and the weight product rounds once more: within 2^-6 relative; the GPU test
(tests/gpu/test_fused_elementwise_gpu.py) holds the compiled kernel to the reference's rounding."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.norm import rms_norm_reference


@pytest.fixture(scope="module")
def kernel():
    from moefleet.engine.kernels import rms_norm
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(rms_norm._rms_norm_kernel, InterpretedFunction):
        pytest.skip("Triton kernels are compiled here (TRITON_INTERPRET unset): tests/gpu covers them")
    return rms_norm


@pytest.mark.parametrize("width", [64, 96, 128, 200])
def test_float32_rows_equal_reference(kernel, width):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(7, width, generator=gen) * 3
    w = torch.randn(width, generator=gen)
    got = kernel.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_bfloat16_within_two_ulps_and_dtype_promotion(kernel):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 3, 64, generator=gen) * 4).to(torch.bfloat16)
    for w in (torch.randn(64, generator=gen).to(torch.bfloat16), torch.randn(64, generator=gen)):
        got = kernel.rms_norm(x, w, 1e-5)
        ref = rms_norm_reference(x, w, 1e-5)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        bound = ref.float().abs().clamp_min(1e-3) * 2**-6  # two bf16 ulps (8 significant bits)
        assert ((got.float() - ref.float()).abs() <= bound).all()


def test_strided_heads_of_a_fused_projection(kernel):
    """q/k norms run on per-head views of a fused QKV output: rows strided, last dim contiguous."""
    gen = torch.Generator().manual_seed(5)
    tokens, heads, kv_heads, dim = 4, 4, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    assert not k.is_contiguous()
    w = torch.rand(dim, generator=gen) + 0.5
    got = kernel.rms_norm(k, w, 1e-6)
    torch.testing.assert_close(got, rms_norm_reference(k, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_empty_input_and_bad_weight(kernel):
    w = torch.ones(16)
    assert kernel.rms_norm(torch.empty(0, 16), w, 1e-6).shape == (0, 16)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernel.rms_norm(torch.ones(2, 16), torch.ones(8), 1e-6)
