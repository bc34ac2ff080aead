"""The single-rank MoE fast path's expert call (`Experts.forward_topk`: the fused kernel over token rows by
top-k id, run here under Triton's interpreter) against the staged path the CPU engine uses (LocalDispatcher
permutation, per-expert torch experts, weighted index_add), on a tiny model's real MoE layers, float32.
On CUDA the MoE stages take this path (tests/gpu/test_moe_local_path_gpu.py); on CPU it never does."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.moe import MoE
from moefleet.engine.loader import load_model
from support.tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def interpreted():
    from moefleet.engine.kernels import fused_moe
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(fused_moe._moe_gemm_kernel, InterpretedFunction):
        pytest.skip("Triton kernels are compiled here (TRITON_INTERPRET unset): tests/gpu covers them")


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_forward_topk_equals_staged_path(interpreted, name):
    model = load_model(tiny_model_dir(name), "cpu", torch.float32)
    layers = [m for m in model.modules() if type(m) is MoE]
    assert layers
    gen = torch.Generator().manual_seed(1)
    moe = layers[0]
    hidden = torch.randn(5, moe.experts.w13.shape[-1], generator=gen)
    assert not moe.local_topk_path(hidden, moe.dispatcher)  # CPU keeps the dispatcher
    with torch.inference_mode():
        step = moe.stage_route(hidden)
        fast = moe.experts.forward_topk(step.dispatch_input, step.physical_ids, step.topk_weights)
        moe.stage_dispatch(step, moe.dispatcher)
        moe.stage_experts(step, moe.dispatcher)
        staged = moe.dispatcher.combine_finish(step.pending)
    torch.testing.assert_close(fast, staged, atol=1e-5, rtol=1e-5)
