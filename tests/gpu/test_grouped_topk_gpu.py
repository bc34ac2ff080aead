"""The fused DeepSeek-V3 expert selection on a GPU against router.grouped_topk (the torch path)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_fused_grouped_topk_equals_torch_on_gpu(tokens):
    from moefleet.engine.kernels.grouped_topk import fused_grouped_topk
    from moefleet.engine.layers.router import grouped_topk

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logits = torch.randn(tokens, 256, device="cuda", generator=gen) * 2
    bias = torch.randn(256, device="cuda", generator=gen) * 0.5
    want_w, want_ids = grouped_topk(logits.sigmoid(), bias, 8, 8, 4, True, 2.5)
    got_w, got_ids = fused_grouped_topk(logits, bias, 8, 8, 4, True, 2.5)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
