"""Block FP8 (e4m3) formats in plain torch (no Triton: the CPU paths and the loader use these).

Weights (DeepSeek-V3/R1, Kimi-K2): W [O, I] as float8_e4m3fn plus `weight_scale_inv` [ceil(O/bo),
ceil(I/bi)] float32, W = fp8 * scale per bo x bi tile. Activations (w8a8): one float32 scale per row per
group of columns, scale = amax / 448. `fp8_quant.quantize_per_token_group` is the Triton version of
`quantize_per_token_group_reference`.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_EPS = 1e-10  # an all-zero group gets this scale (its values quantise to 0 either way)


def quantize_per_token_group_reference(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize_per_token_group` (the same formula, column group by column group)."""
    rows, cols = x.shape
    groups = -(-cols // group)
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    for g in range(groups):
        part = x[:, g * group : (g + 1) * group].float()
        scale = part.abs().amax(dim=1).clamp(min=SCALE_EPS) / FP8_MAX
        q[:, g * group : (g + 1) * group] = (part / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scales[:, g] = scale
    return q, scales


def quantize_weight_block(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., O, I] -> (fp8 [..., O, I], scale_inv [..., ceil(O/bo), ceil(I/bi)]): amax/448 per tile.

    DeepSeek's format; used to make FP8 checkpoints from bf16 weights (tiny test models) and by
    `--quantization fp8` on a bf16 checkpoint. Ragged edge tiles are padded with zeros for the amax.
    """
    rows, cols = weight.shape[-2:]
    br, bc = block
    tiles_r, tiles_c = -(-rows // br), -(-cols // bc)
    padded = torch.nn.functional.pad(weight.float(), (0, tiles_c * bc - cols, 0, tiles_r * br - rows))
    tiles = padded.reshape(*weight.shape[:-2], tiles_r, br, tiles_c, bc)
    scales = tiles.abs().amax(dim=(-3, -1)).clamp(min=SCALE_EPS) / FP8_MAX
    q = (tiles / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(padded.shape)[..., :rows, :cols].contiguous()
    return q, scales


def dequantize_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 W [..., O, I] with scale_inv [..., ceil(O/bo), ceil(I/bi)] -> float32 (the CPU path's weights)."""
    rows, cols = weight.shape[-2:]
    br, bc = block
    scale = scale_inv.float().repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]
    return weight.float() * scale
