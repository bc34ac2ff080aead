"""On an NVIDIA GPU: the single-rank MoE fast path (`MoE.forward` -> `Experts.forward_topk`, one fused pass
over token rows by top-k id) against the staged dispatcher path (permute, grouped kernel, weighted index_add)
of the same layer, on the tiny models' real MoE layers. float32: equal to rounding; bfloat16: the fast path
sums the K weighted outputs in float32 where the staged path adds them in bf16, so within bf16 rounding of
the output scale. Whole-model float32 greedy parity with the fast path on is tests/gpu/test_cuda_parity.py."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.token_dispatch import LocalDispatcher
from moefleet.engine.loader import load_model
from support.tiny_models import tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


class _Permuting(LocalDispatcher):
    """The same dispatcher under another type: the stages then take the permute/index_add path."""


def _staged(moe: MoE, hidden: torch.Tensor) -> torch.Tensor:
    dispatcher = _Permuting(moe.dispatcher.num_local_experts)
    step = moe.stage_route(hidden)
    moe.stage_dispatch(step, dispatcher)
    assert not step.local
    moe.stage_experts(step, dispatcher)
    return moe.stage_combine(step, dispatcher)


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_staged(name, dtype):
    model = load_model(tiny_model_dir(name), "cuda", dtype)
    layers = [m for m in model.modules() if type(m) is MoE]
    assert layers, "no plain MoE layer in the tiny model"
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 7, 300):
        hidden = torch.randn(tokens, layers[0].experts.w13.shape[-1], generator=gen).to("cuda", dtype)
        for moe in layers:
            assert moe.local_topk_path(hidden, moe.dispatcher)
            with torch.inference_mode():
                fast, staged = moe(hidden).float(), _staged(moe, hidden).float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(fast, staged, atol=tol * staged.abs().max().item(), rtol=tol)
