"""Plain linear layer whose parameters know how to load themselves from checkpoint tensors.

Every parameter carries a `weight_loader(param, loaded)` (nano-vllm style) so the model's `load_weights` is
a name lookup; layers that pack several checkpoint tensors into one parameter define their own loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moefleet.engine.kernels import fp8_cublas, fp8_splitk_configs
from moefleet.engine.kernels.fp8_splitk_configs import SplitKConfig
from torch import nn


def default_weight_loader(param: nn.Parameter | torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a checkpoint tensor into `param`, converting dtype; shapes must match exactly."""
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def set_weight_loader(param: nn.Parameter, loader=default_weight_loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class Linear(nn.Module):
    """y = x W^T (+ b). W is [out_features, in_features] exactly as in HF checkpoints."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), False)
        )
        self.bias = (
            set_weight_loader(nn.Parameter(torch.zeros(out_features, dtype=dtype), False)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W kept in float8_e4m3fn plus block scales (DeepSeek-V3/R1, Kimi-K2 checkpoints).

    `weight` [out, in] fp8 and `weight_scale_inv` [ceil(out/bo), ceil(in/bi)] float32 load by name from the
    checkpoint (W = fp8 * scale per bo x bi tile). On CUDA cuBLAS's blockwise FP8 GEMM runs where verified
    (`kernels.fp8_cublas`: SM90, 128x128 blocks, K a multiple of 512), else a Triton w8a8 block GEMM (both
    quantise the activations per token per group of bi columns on the fly); on CPU the weight is dequantised
    and multiplied in the activation dtype (exact w.r.t. the dequantised weights; slow, for tests).
    """

    def __init__(
        self, in_features: int, out_features: int, block: tuple[int, int], bias: bool = False, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        scale_shape = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), False)
        )
        self.weight_scale_inv = set_weight_loader(
            nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), False)
        )
        self.bias = (
            set_weight_loader(nn.Parameter(torch.zeros(out_features, dtype=dtype), False)) if bias else None
        )
        # torch's library GEMM (cuBLAS blockwise FP8) where verified; `gemm_backend.set_gemm_backend(model,
        # "triton")` turns it off (side-by-side runs). `_cublas`: decided at the first CUDA forward, then kept.
        self.library_gemms = True
        self._cublas: bool | None = None
        # Decode-size rows: the split-K Triton GEMM where `fp8_splitk_configs` measured it faster than cuBLAS
        # (`set_gemm_backend(model, "cublas")` turns it off). Decided per row count, then kept.
        self.splitk_gemms = True
        self._splitk: dict[int, SplitKConfig | None] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moefleet.engine.kernels.fp8_blocks import dequantize_block

        flat = x.reshape(-1, self.in_features)
        if x.is_cuda:
            from moefleet.engine.kernels.fused_moe import w8a8_block_linear

            if self._cublas is None:
                self._cublas = fp8_cublas.shape_ok(
                    self.out_features, self.in_features, self.block
                ) and fp8_cublas.device_ok(x.device)
            splitk = self._splitk_config(flat.shape[0]) if self.splitk_gemms else None
            if splitk is not None:
                from moefleet.engine.kernels import fp8_splitk

                out = fp8_splitk.linear(flat, self.weight, self.weight_scale_inv, splitk)  # type: ignore[arg-type]
            elif self._cublas and self.library_gemms:
                out = fp8_cublas.linear(flat, self.weight, self.weight_scale_inv)
            else:
                out = w8a8_block_linear(flat, self.weight, self.weight_scale_inv, self.block)  # type: ignore[arg-type]
            if self.bias is not None:
                out = out + self.bias
        else:
            weight = dequantize_block(self.weight, self.weight_scale_inv, self.block).to(x.dtype)  # type: ignore[arg-type]
            out = F.linear(flat, weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _splitk_config(self, rows: int) -> SplitKConfig | None:
        if rows not in self._splitk:
            ok = tuple(self.block) == (fp8_splitk_configs.GROUP,) * 2 and rows > 0
            self._splitk[rows] = (
                fp8_splitk_configs.choose(rows, self.out_features, self.in_features) if ok else None
            )
        return self._splitk[rows]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 block={list(self.block)}"
