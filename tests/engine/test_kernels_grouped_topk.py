"""engine/kernels/grouped_topk.py under the Triton interpreter against router.grouped_topk (the torch path that
the transformers parity tests cover), float32."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels.grouped_topk import fused_grouped_topk, supports
from moefleet.engine.layers.router import grouped_topk


@pytest.mark.parametrize(
    "tokens,experts,n_group,topk_group,top_k,bias,renorm,scale",
    [
        (5, 256, 8, 4, 8, True, True, 2.5),  # DeepSeek-V3
        (3, 16, 4, 2, 4, True, True, 1.0),
        (4, 32, 1, 1, 4, False, False, 1.0),  # no groups
        (2, 64, 8, 3, 2, True, False, 1.5),
        (0, 256, 8, 4, 8, True, True, 2.5),
    ],
)
def test_fused_grouped_topk_equals_torch(tokens, experts, n_group, topk_group, top_k, bias, renorm, scale):
    gen = torch.Generator().manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    b = torch.randn(experts, generator=gen) * 0.5 if bias else None
    want_w, want_ids = grouped_topk(logits.sigmoid(), b, top_k, n_group, topk_group, renorm, scale)
    got_w, got_ids = fused_grouped_topk(logits, b, top_k, n_group, topk_group, renorm, scale)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32
    assert torch.equal(got_ids, want_ids)  # same experts in the same (descending) order
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


def test_group_selection_excludes_a_strong_expert_in_a_weak_group():
    # group 0 holds the single best expert but a weak second one; groups 1-3 two good experts each (no ties)
    logits = torch.full((1, 16), -4.0)
    logits[0, 0] = 5.0
    logits[0, [4, 5, 8, 9, 12, 13]] = torch.tensor([3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    w, ids = fused_grouped_topk(logits, None, 2, 4, 2, False, 1.0)
    assert ids.tolist() == [[4, 5]]  # groups 1 and 2 win; expert 0's group loses on its weak second expert
    want_w, want_ids = grouped_topk(logits.sigmoid(), None, 2, 4, 2, False, 1.0)
    assert torch.equal(ids, want_ids)


def test_supports_and_error():
    assert supports(256, 8, 8) and not supports(160, 8, 6)
    with pytest.raises(ValueError, match="grouped_topk"):
        fused_grouped_topk(torch.zeros(1, 160), None, 6, 8, 3, True, 1.0)
