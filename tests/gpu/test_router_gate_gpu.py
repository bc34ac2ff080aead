"""Sigmoid routing's gate on an NVIDIA GPU: with bf16 activations and a gate of bf16 values (as checkpoints store
it) the logits come from a bf16 GEMM with float32 accumulation and output; it must equal the reference's float32
GEMM up to summation order (each bf16 x bf16 product is exact in float32), and pick the same experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moefleet.engine.layers.router import Router, RoutingConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
DEV = torch.device("cuda", 0)


def test_bf16_gate_gemm_equals_the_float32_reference_up_to_order():
    torch.manual_seed(0)
    config = RoutingConfig(
        num_experts=256, top_k=8, scoring="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, correction_bias=True,
    )  # fmt: skip
    router = Router(7168, config).to(DEV)
    with torch.no_grad():
        router.weight.copy_((torch.randn(256, 7168, device=DEV) * 0.02).to(torch.bfloat16))
        router.e_score_correction_bias.normal_(0, 0.01)
    hidden = torch.randn(300, 7168, device=DEV).to(torch.bfloat16)
    router.prepare_gate()
    assert router.bf16_gate() is not None
    got = router.logits_float32(hidden)
    ref = F.linear(hidden.float(), router.weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    weights, ids = router(hidden)
    with torch.no_grad():
        router.weight.add_(0)  # a new version: the float32 GEMM until prepared again
    assert router.bf16_gate() is None
    ref_weights, ref_ids = router(hidden)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
