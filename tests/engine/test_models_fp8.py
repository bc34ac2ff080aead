"""Block-FP8 checkpoints (DeepSeek's released format): kept in FP8 (`--quantization auto`/`fp8`) or
dequantized while loading (`none`).

Oracles are independent of the code under test: the test's own tile-by-tile quantizer (`quantize_and_restore`
writes the FP8 checkpoint and the float32 weights it stands for), hand-computed block scales, and
transformers run on the restored float32 weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moefleet.engine.loader import build_model, load_model
from moefleet.engine.models.fp8 import dequantize_block_fp8, dequantize_stream
from safetensors.torch import load_file, save_file
from support.fp8_checkpoint import BLOCK, quantize_and_restore, quantize_block_fp8, write_fp8_checkpoint
from support.tiny_models import PagedDriver, one_torch_thread, tiny_model_dir

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")


def test_dequantize_ragged_tiles_hand_computed():
    # 40 x 24 = 2.5 x 1.5 tiles of 16: every fp8 value is 1.5 (exact in e4m3), tile (i, j) has scale
    # 2 ** (i - j), so element (r, c) must be 1.5 * 2 ** (r // 16 - c // 16).
    q = torch.full((40, 24), 1.5).to(torch.float8_e4m3fn)
    q[39, 23] = -0.375  # an exact e4m3 value in the ragged corner tile
    s = torch.tensor([[2.0**i / 2.0**j for j in range(2)] for i in range(3)])
    restored = dequantize_block_fp8(q, s, BLOCK)
    assert restored[0, 0] == 1.5 and restored[15, 15] == 1.5
    assert restored[16, 0] == 3.0 and restored[0, 16] == 0.75
    assert restored[32, 0] == 6.0 and restored[39, 16] == 3.0
    assert restored[39, 23] == -0.375 * 2.0
    with pytest.raises(ValueError, match="expected \\(3, 2\\)"):
        dequantize_block_fp8(q, s[:2], BLOCK)


def test_stream_pairs_across_order_and_reports_orphans():
    q, s = quantize_block_fp8(torch.randn(16, 16), BLOCK)
    names = dict(
        dequantize_stream([("a.weight_scale_inv", s), ("n.weight", torch.ones(3)), ("a.weight", q)], BLOCK)
    )
    assert set(names) == {"a.weight", "n.weight"} and names["a.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="no partner.*b.weight"):
        list(dequantize_stream([("b.weight", q)], BLOCK))


def test_fp8_deepseek_checkpoint_loads_dequantized(tmp_path):
    src = tiny_model_dir("deepseek_grouped")
    dst = tmp_path / "fp8"
    restored_checkpoint = write_fp8_checkpoint(src, dst)
    with one_torch_thread():
        model = load_model(dst, quantization="none")
        reference = build_model(json.loads((src / "config.json").read_text()))
        reference.load_weights(restored_checkpoint.items())
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: a ragged tile
    expected = restored_checkpoint[name]
    torch.testing.assert_close(dict(model.named_parameters())[name], expected, atol=0, rtol=0)
    experts = model.get_submodule("model.layers.2.mlp.experts")
    e5 = "model.layers.2.mlp.experts.5.down_proj.weight"
    torch.testing.assert_close(experts.w2[5], restored_checkpoint[e5], atol=0, rtol=0)
    prompt = [(0, list(range(10, 30)))]
    with one_torch_thread():
        fp8_logits = PagedDriver(model).step(prompt, all_logits=True)
        ref_logits = PagedDriver(reference).step(prompt, all_logits=True)
    # The same model as one loaded from the weights the FP8 tensors stand for.
    torch.testing.assert_close(fp8_logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """(FP8 checkpoint dir, float32 dir holding the weights it stands for, restored tensors)."""
    src = tiny_model_dir("deepseek_grouped")
    root = tmp_path_factory.mktemp("fp8_kept")
    restored = write_fp8_checkpoint(src, root / "fp8")
    reference = root / "restored"
    shutil.copytree(src, reference)
    save_file({k: v.contiguous() for k, v in restored.items()}, str(reference / "model.safetensors"))
    return root / "fp8", reference, restored


def test_fp8_checkpoint_stays_fp8_bitwise(fp8_dirs):
    from moefleet.engine.layers.linear import Fp8Linear, Linear

    fp8_dir, _, _ = fp8_dirs
    stored = load_file(str(fp8_dir / "model.safetensors"))
    with one_torch_thread():
        model = load_model(fp8_dir)  # auto: what the checkpoint has
    modules = dict(model.named_modules())
    q_a = modules["model.layers.1.self_attn.q_a_proj"]
    assert isinstance(q_a, Fp8Linear) and q_a.weight.dtype == torch.float8_e4m3fn
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: a ragged tile
    kv_a = modules["model.layers.1.self_attn.kv_a_proj_with_mqa"]
    assert torch.equal(kv_a.weight.view(torch.uint8), stored[name].view(torch.uint8))
    assert torch.equal(kv_a.weight_scale_inv, stored[name + "_scale_inv"])
    # kv_b_proj stays high precision (absorbed MLA reads its weight): dequantized, as the test restored it
    kv_b = modules["model.layers.1.self_attn.kv_b_proj"]
    assert isinstance(kv_b, Linear) and kv_b.weight.dtype == torch.float32
    experts = modules["model.layers.2.mlp.experts"]
    e5 = "model.layers.2.mlp.experts.5."
    assert torch.equal(experts.w2[5].view(torch.uint8), stored[e5 + "down_proj.weight"].view(torch.uint8))
    assert torch.equal(experts.w2_scale_inv[5], stored[e5 + "down_proj.weight_scale_inv"])
    tiles = experts.intermediate_size // BLOCK[0]
    assert torch.equal(experts.w13_scale_inv[5, tiles:], stored[e5 + "up_proj.weight_scale_inv"])
    assert torch.equal(
        experts.w13[5, : tiles * BLOCK[0]].view(torch.uint8),
        stored[e5 + "gate_proj.weight"].view(torch.uint8),
    )
    # the dense layer's FFN and the shared experts are FP8 too; the router gate and lm_head never
    assert isinstance(modules["model.layers.0.mlp.gate_proj"], Fp8Linear)
    assert model.lm_head.weight.dtype == torch.float32


def test_fp8_checkpoint_greedy_equals_transformers_on_restored_weights(fp8_dirs):
    from moefleet.engine import LLM, SamplingParams
    from support.reference import transformers_greedy

    pytest.importorskip("transformers")
    fp8_dir, reference, _ = fp8_dirs
    prompts = [list(range(10, 30)), [5, 7, 9]]
    with one_torch_thread():
        expected = transformers_greedy(reference, prompts, 8)
        llm = LLM(str(fp8_dir), max_num_seqs=4, max_num_batched_tokens=64)
        assert llm.engine.model_runner.model.get_submodule("model.layers.2.mlp.experts").block_shape == BLOCK
        got = [
            r.token_ids
            for r in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        ]
    assert got == expected


def test_quantization_fp8_on_a_bf16_checkpoint_and_bad_values(tmp_path):
    from moefleet.engine.fp8_weights import resolve_quantization

    src = tiny_model_dir("deepseek_grouped")
    with pytest.raises(ValueError, match="not one of auto, none, fp8"):
        resolve_quantization({}, "int4")
    assert resolve_quantization({}, "auto") == "none"
    # 128x128 blocks on the tiny model: one ragged tile per small matrix; moe_intermediate_size 32 < 128 rows
    with pytest.raises(ValueError, match="not a multiple of the weight block rows 128"):
        load_model(src, quantization="fp8")


def test_quantize_model_in_place_matches_block_quantizer():
    from moefleet.engine.fp8_weights import quantize_model
    from moefleet.engine.layers.linear import Fp8Linear

    with one_torch_thread():
        model = load_model(tiny_model_dir("deepseek_grouped"))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        quantize_model(model, BLOCK)
    name = "model.layers.1.self_attn.o_proj"
    layer = model.get_submodule(name)
    assert isinstance(layer, Fp8Linear)
    q, s, _ = quantize_and_restore(before[name + ".weight"], BLOCK)  # the test's own tile-by-tile quantizer
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(layer.weight_scale_inv, s, atol=0, rtol=1e-6)
    experts = model.get_submodule("model.layers.2.mlp.experts")
    q, s, _ = quantize_and_restore(before["model.layers.2.mlp.experts.w2"][3], BLOCK)
    assert torch.equal(experts.w2[3].view(torch.uint8), q.view(torch.uint8))
    assert not isinstance(model.get_submodule("model.layers.1.self_attn.kv_b_proj"), Fp8Linear)


def test_fp8_stream_pairs_scales_in_any_order(fp8_dirs):
    """Scales before their weights (other shard order) load the same FP8 model; orphans are named."""
    from moefleet.engine.fp8_weights import apply_plan, checkpoint_block, fp8_stream, plan_fp8

    fp8_dir, _, _ = fp8_dirs
    config = json.loads((fp8_dir / "config.json").read_text())
    stored = load_file(str(fp8_dir / "model.safetensors"))
    with one_torch_thread():
        in_order = load_model(fp8_dir)
        model = build_model(config)
        plan = plan_fp8(model, stored, config)
        apply_plan(model, plan)
        model.fp8_block_size = None
        reversed_items = sorted(stored.items(), key=lambda kv: kv[0].endswith("_scale_inv"), reverse=True)
        model.load_weights(fp8_stream(reversed_items, model, plan, checkpoint_block(config), "cpu"))
    tensors_a = [*in_order.named_parameters(), *in_order.named_buffers()]  # expert scales are buffers
    tensors_b = [*model.named_parameters(), *model.named_buffers()]
    assert any(n.endswith("w13_scale_inv") for n, _ in tensors_a)
    for (name, a), (_, b) in zip(tensors_a, tensors_b, strict=True):
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
            b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
        ), name
    with pytest.raises(ValueError, match="no partner.*q_a_proj.weight_scale_inv"):
        name = "model.layers.1.self_attn.q_a_proj.weight"
        list(fp8_stream([(name + "_scale_inv", stored[name + "_scale_inv"])], model, plan, BLOCK, "cpu"))
