"""Block-FP8 checkpoints (DeepSeek's released format) are dequantized while loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moefleet.engine.loader import build_model, load_model, safetensors_files
from moefleet.engine.models.fp8 import dequantize_block_fp8, dequantize_stream
from safetensors.torch import load_file, save_file
from support.tiny_models import PagedDriver, one_torch_thread, tiny_model_dir

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")
BLOCK = (16, 16)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer: per-tile amax / 448 scales (what DeepSeek's checkpoints hold as scale_inv)."""
    quantized, scales, _ = quantize_and_restore(weight, block)
    return quantized, scales


def quantize_and_restore(weight: torch.Tensor, block: tuple[int, int]):
    """(fp8 weight, scale_inv, the weight it stands for), tile by tile."""
    rows, cols = weight.shape
    br, bc = block
    scales = torch.empty(-(-rows // br), -(-cols // bc))
    quantized = torch.empty_like(weight, dtype=torch.float8_e4m3fn)
    restored = torch.empty_like(weight)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tiles = (slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc))
            scales[i, j] = weight[tiles].abs().max().clamp(min=1e-12) / 448.0
            quantized[tiles] = (weight[tiles] / scales[i, j]).to(torch.float8_e4m3fn)
            restored[tiles] = quantized[tiles].float() * scales[i, j]
    return quantized, scales, restored


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    # As in DeepSeek's release: linear weights only (not embeddings, norms, router gate, lm_head).
    return tensor.dim() == 2 and "embed" not in name and "lm_head" not in name and ".mlp.gate." not in name


def test_dequantize_ragged_tiles():
    weight = torch.randn(40, 24)  # 40 = 2.5 tiles of 16 rows, 24 = 1.5 tiles of 16 columns
    q, s = quantize_block_fp8(weight, BLOCK)
    restored = dequantize_block_fp8(q, s, BLOCK)
    torch.testing.assert_close(restored, weight, atol=0.0, rtol=0.07)  # e4m3 keeps 3 mantissa bits
    assert restored[35, 20] == q[35, 20].float() * s[2, 1]
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
    shutil.copytree(src, dst)
    restored_checkpoint = {}
    for file in safetensors_files(dst):
        out = {}
        for name, tensor in load_file(str(file)).items():
            if is_quantized(name, tensor):
                out[name], out[name + "_scale_inv"], restored_checkpoint[name] = quantize_and_restore(
                    tensor, BLOCK
                )
            else:
                out[name] = restored_checkpoint[name] = tensor
        save_file(out, str(file))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    (dst / "config.json").write_text(json.dumps(config))

    with one_torch_thread():
        model = load_model(dst)
        reference = build_model(json.loads((src / "config.json").read_text()))
        reference.load_weights(restored_checkpoint.items())
    stored = load_file(str(dst / "model.safetensors"))
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: a ragged tile
    expected = dequantize_block_fp8(stored[name], stored[name + "_scale_inv"], BLOCK)
    torch.testing.assert_close(dict(model.named_parameters())[name], expected, atol=0, rtol=0)
    experts = model.get_submodule("model.layers.2.mlp.experts")
    e5 = "model.layers.2.mlp.experts.5.down_proj.weight"
    torch.testing.assert_close(
        experts.w2[5], dequantize_block_fp8(stored[e5], stored[e5 + "_scale_inv"], BLOCK)
    )
    prompt = [(0, list(range(10, 30)))]
    with one_torch_thread():
        fp8_logits = PagedDriver(model).step(prompt, all_logits=True)
        ref_logits = PagedDriver(reference).step(prompt, all_logits=True)
    # The same model as one loaded from the weights the FP8 tensors stand for.
    torch.testing.assert_close(fp8_logits, ref_logits, atol=1e-5, rtol=1e-5)
