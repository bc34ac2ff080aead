"""MXFP4 (OCP Microscaling, element type FP4 E2M1, block 32, shared E8M0 scale) as gpt-oss ships its experts.

A checkpoint matrix W [..., rows, cols] is stored as `<name>_blocks` uint8 [..., rows, cols / 32, 16] (two
4-bit codes per byte, the LOW nibble holding the even element) and `<name>_scales` uint8 [..., rows, cols / 32]
(a biased exponent: the block's factor is 2^(scale - 127)). Element value = e2m1(code) * 2^(scale - 127),
e2m1 codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8..15 their negatives (the top bit is the sign).

Loading dequantizes into the model dtype (a Triton MXFP4 x bf16 grouped GEMM that keeps the 4-bit weights
resident is not implemented). `quantize_mxfp4` (round to nearest, scale = 2^(floor(log2(amax)) - 2)) is
the inverse used to write tiny test checkpoints.
"""

from __future__ import annotations

import torch

BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """blocks uint8 [..., G, 16] + scales uint8 [..., G] -> [..., G * 32] in `dtype` (exact in float32)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
            f"(expected blocks [..., G, {BLOCK // 2}] and scales [..., G])"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = lut[codes].flatten(-2)  # [..., G, 32]
    exponent = scales.to(torch.int32) - SCALE_BIAS
    out = torch.ldexp(values, exponent[..., None].to(torch.float32))
    return out.flatten(-2).to(dtype)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N] (N % 32 == 0) -> (blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]), round to nearest."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {x.shape[-1]}")
    grouped = x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = grouped.abs().amax(dim=-1)
    exponent = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2, torch.full_like(amax, -127)
    )
    exponent = exponent.clamp(-SCALE_BIAS, 254 - SCALE_BIAS)
    scaled = grouped / torch.pow(2.0, exponent)[..., None]
    lut = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)
    magnitude = (scaled.abs()[..., None] - lut).abs().argmin(dim=-1)  # nearest |e2m1|, codes 0..7
    codes = (magnitude | ((scaled < 0) & (magnitude > 0)).long() << 3).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.to(torch.uint8), (exponent + SCALE_BIAS).to(torch.uint8)
