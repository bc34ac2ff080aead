"""`--gemm-backend {auto,cublas,triton}`: which GEMM kernels a model's layers may use, for side-by-side runs.

- auto: torch's library GEMMs where verified (cuBLAS blockwise FP8 for `Fp8Linear` and prefill experts, bf16
  `torch._grouped_mm` for prefill experts), and decode-size FP8 linears on the split-K Triton GEMM where the
  measured table says it beats cuBLAS (`kernels.fp8_splitk_configs`);
- cublas: the library GEMMs, no split-K (auto before the split-K kernel);
- triton: only our original Triton kernels (w8a8 block GEMM, fused experts).
Set on the layer instances (`library_gemms`, `splitk_gemms`), never process-wide.
"""

from __future__ import annotations

from torch import nn

GEMM_BACKENDS = ("auto", "cublas", "triton")


def set_gemm_backend(model: nn.Module, backend: str) -> int:
    """Apply `backend` to every layer with a GEMM choice; returns how many layers that is."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"gemm backend {backend!r} must be one of {GEMM_BACKENDS}")
    count = 0
    for module in model.modules():
        if hasattr(module, "library_gemms"):
            setattr(module, "library_gemms", backend != "triton")  # noqa: B010 (a bool on an nn.Module)
            count += 1
        if hasattr(module, "splitk_gemms"):
            setattr(module, "splitk_gemms", backend == "auto")  # noqa: B010
    return count
