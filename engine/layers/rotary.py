"""Rotary position embedding with the scaling types DeepSeek-V3/Kimi-K2 and Qwen3 checkpoints use.

Supports rope_type "default", "linear", "llama3" and "yarn" (DeepSeek's variant with mscale /
mscale_all_dim, as in transformers' modeling_rope_utils). Two layouts: neox (rotate halves, Qwen) and
interleaved pairs (DeepSeek's checkpoints: `rope_interleave`).
Shape legend: T tokens, H heads, R rotary dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from moefleet.engine.forward_batch import ForwardBatch
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """Normalised rope settings (from config.json `rope_scaling` or `rope_parameters`)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def parse_rope_scaling(config: dict, max_position_embeddings: int) -> tuple[float, RopeScaling]:
    """Read (rope_theta, RopeScaling) from an HF config dict (old `rope_scaling` or new `rope_parameters`)."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    if "factor" not in params:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor' field")
    original = params.get("original_max_position_embeddings")
    if rope_type in ("yarn", "llama3") and original is None:
        original = max_position_embeddings
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        original_max_position_embeddings=None if original is None else int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(head_dim: int, scaling: RopeScaling) -> float:
    """DeepSeek MLA: head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn."""
    scale = head_dim**-0.5
    if scaling.rope_type != "default" and scaling.mscale_all_dim:
        m = yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * m * m
    return scale


def compute_inv_freq(dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor cos/sin are multiplied by."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling.rope_type == "default":
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(dim, theta, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    assert s.original_max_position_embeddings is not None
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    assert s.original_max_position_embeddings is not None
    factor = s.factor
    if s.attention_factor is not None:
        attention_factor = float(s.attention_factor)
    elif s.mscale and s.mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, s.mscale) / yarn_get_mscale(factor, s.mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        orig = s.original_max_position_embeddings
        assert orig is not None
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H, R] and k [T, Hk, R] at `positions` [T].

    cos/sin are computed in float32 (exact for any position) then cast to the input dtype, which is what HF
    does. One instance is shared by all layers of a model: given the step's ForwardBatch, cos/sin are
    computed once per step and memoised on the batch (no state on the module, so two batches can be in
    flight at once).
    """

    inv_freq: torch.Tensor

    def __init__(
        self, rotary_dim: int, theta: float, scaling: RopeScaling | None = None, interleaved: bool = False
    ):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        inv_freq, self.attention_scaling = compute_inv_freq(rotary_dim, theta, scaling or RopeScaling())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, R/2]
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, batch: ForwardBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if batch is None or positions is not batch.positions:
            cos, sin = self.cos_sin(positions, q.dtype)
        else:
            cos, sin = batch.memo(("rope", id(self), q.dtype), lambda: self.cos_sin(positions, q.dtype))
        if q.is_cuda:  # one fused kernel per tensor (engine/kernels/rotary.py), same rounding
            from moefleet.engine.kernels.rotary import fused_rotary_supported, rotary

            if fused_rotary_supported(q, cos) and fused_rotary_supported(k, cos):
                return rotary(q, cos, sin, self.interleaved), rotary(k, cos, sin, self.interleaved)
        return self.rotate_reference(q, cos, sin), self.rotate_reference(k, cos, sin)

    def rotate_reference(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The torch formula (Hugging Face's) for x [T, H, R] and cos/sin [T, R/2]."""
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        if self.interleaved:
            # Pairs (x0, x1), (x2, x3), ... rotated by one frequency each; output de-interleaved (first all
            # rotated evens, then odds), exactly as DeepSeek/HF do, so q and k stay consistent.
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
