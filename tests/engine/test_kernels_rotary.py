"""The fused rotary kernel (engine/kernels/rotary.py) against the torch formula
(`RotaryEmbedding.rotate_reference`, Hugging Face's), under Triton's interpreter on CPU, float32, both
layouts (NeoX halves and interleaved pairs), strided per-head views as the models pass them (a slice of a
projection, MLA's rope part), and the cos/sin the module computes for real positions."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.rotary import RotaryEmbedding


@pytest.fixture(scope="module")
def kernel():
    from moefleet.engine.kernels import rotary
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(rotary._rotary_kernel, InterpretedFunction):
        pytest.skip("Triton kernels are compiled here (TRITON_INTERPRET unset): tests/gpu covers them")
    return rotary


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim", [16, 64, 24])
def test_equals_reference(kernel, interleaved, dim):
    gen = torch.Generator().manual_seed(dim)
    rope = RotaryEmbedding(dim, 10000.0, interleaved=interleaved)
    positions = torch.tensor([0, 1, 7, 300, 4095])
    cos, sin = rope.cos_sin(positions, torch.float32)
    # q: per-head view of a wider projection (rows strided), as MLA's rope slice of [T, H, nope + rope]
    wide = torch.randn(5, 3, dim + 32, generator=gen)
    q = wide[:, :, 32:]
    assert not q.is_contiguous()
    got = kernel.rotary(q, cos, sin, interleaved)
    torch.testing.assert_close(got, rope.rotate_reference(q, cos, sin), atol=1e-6, rtol=1e-6)
    assert got.is_contiguous()


def test_rotation_preserves_pair_norms(kernel):
    """An independent check from the definition: each (x1_i, x2_i) pair is rotated, so its norm is kept."""
    gen = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(32, 10000.0)
    cos, sin = rope.cos_sin(torch.arange(6), torch.float32)
    x = torch.randn(6, 2, 32, generator=gen)
    y = kernel.rotary(x, cos, sin, False)
    torch.testing.assert_close(y[..., :16] ** 2 + y[..., 16:] ** 2, x[..., :16] ** 2 + x[..., 16:] ** 2)
    torch.testing.assert_close(y[0], x[0])  # position 0: the identity


def test_bad_shapes_are_refused(kernel):
    cos = torch.ones(4, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        kernel.rotary(torch.ones(4, 2, 15), cos, cos, False)
    assert kernel.rotary(torch.ones(0, 2, 16), torch.ones(0, 8), torch.ones(0, 8), False).shape == (0, 2, 16)


@pytest.mark.parametrize("interleaved", [False, True])
def test_bfloat16_as_accurate_as_the_torch_formula(kernel, interleaved):
    """bf16: float32 math and one rounding, so never further from the exact rotation of the same bf16 inputs
    than torch's formula (which rounds each product too) by more than one bf16 ulp of the result."""
    rope = RotaryEmbedding(64, 1e6, interleaved=interleaved)
    cos, sin = rope.cos_sin(torch.randint(0, 32768, (24,)), torch.bfloat16)
    x = torch.randn(24, 4, 64 + 32, dtype=torch.bfloat16)[:, :, 32:]
    got = kernel.rotary(x, cos, sin, interleaved).double()
    exact = rope.rotate_reference(x.double(), cos.double(), sin.double())
    ref = rope.rotate_reference(x, cos, sin).double()
    assert ((got - exact).abs() <= (ref - exact).abs() + exact.abs() * 2**-7).all()
