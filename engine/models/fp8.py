"""Block-quantized FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3 "-FP8"): dequantized while loading.

Such checkpoints store a linear weight as float8_e4m3fn plus `<name>_scale_inv` (float32, one scale per
[block_out x block_in] tile, `quantization_config.weight_block_size`); the real weight is
fp8 * scale_inv tile-wise. The engine keeps bf16 weights for now, so tensors are dequantized on the way in;
a weight and its scale may sit in different shards, so each waits for its partner.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
    if hasattr(torch, name)
)


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """weight [O, I] (fp8), scale_inv [ceil(O/bo), ceil(I/bi)] -> float32 [O, I]."""
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"FP8 scale has shape {tuple(scale_inv.shape)}, expected {expected} for a {rows}x{cols} weight "
            f"with weight_block_size {list(block)}"
        )
    scale = (
        scale_inv.float().repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    )
    return weight.float() * scale


def dequantize_stream(
    weights: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int], device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, replacing each (fp8 weight, scale) pair by the dequantized float32 weight.

    Dequantization runs on `device` (the model's: a GPU does it far faster than the host).
    """
    waiting_weights: dict[str, torch.Tensor] = {}
    waiting_scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            weight_name = name[: -len(SCALE_SUFFIX)]
            if weight_name in waiting_weights:
                weight = waiting_weights.pop(weight_name).to(device)
                yield weight_name, dequantize_block_fp8(weight, tensor.to(device), block)
            else:
                waiting_scales[weight_name] = tensor
        elif tensor.dtype in FP8_DTYPES:
            if name in waiting_scales:
                yield (
                    name,
                    dequantize_block_fp8(tensor.to(device), waiting_scales.pop(name).to(device), block),
                )
            else:
                waiting_weights[name] = tensor
        else:
            yield name, tensor
    if waiting_weights or waiting_scales:
        unpaired = sorted(waiting_weights) + [n + SCALE_SUFFIX for n in sorted(waiting_scales)]
        raise ValueError(
            f"FP8 checkpoint: {len(unpaired)} weights/scales have no partner, e.g. {unpaired[:4]}"
        )
