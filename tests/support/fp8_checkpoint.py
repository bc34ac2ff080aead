"""Tiny block-FP8 checkpoints written from the format's definition (DeepSeek's `weight_scale_inv`): the
test's own tile-by-tile quantizer, independent of the engine's FP8 code."""

from __future__ import annotations

import json
import shutil

import torch
from moefleet.engine.loader import safetensors_files
from safetensors.torch import load_file, save_file

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


def write_fp8_checkpoint(src, dst, block=BLOCK):
    """Copy tiny model `src` to `dst` with its linear weights in block FP8; returns the restored weights."""
    shutil.copytree(src, dst)
    restored_checkpoint = {}
    for file in safetensors_files(dst):
        out = {}
        for name, tensor in load_file(str(file)).items():
            if is_quantized(name, tensor):
                out[name], out[name + "_scale_inv"], restored_checkpoint[name] = quantize_and_restore(
                    tensor, block
                )
            else:
                out[name] = restored_checkpoint[name] = tensor
        save_file(out, str(file))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return restored_checkpoint
