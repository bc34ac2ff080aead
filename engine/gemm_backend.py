"""`--gemm-backend {auto,triton}`: whether a model's layers may use torch's library GEMMs where verified
(cuBLAS blockwise FP8 for `Fp8Linear` and prefill experts, bf16 `torch._grouped_mm` for prefill experts) or
only our Triton kernels (side-by-side runs). Set on the layer instances (`library_gemms`), never process-wide.
"""

from __future__ import annotations

from torch import nn

GEMM_BACKENDS = ("auto", "triton")


def set_gemm_backend(model: nn.Module, backend: str) -> int:
    """Apply `backend` to every layer with a GEMM choice; returns how many layers that is."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"gemm backend {backend!r} must be one of {GEMM_BACKENDS}")
    count = 0
    for module in model.modules():
        if hasattr(module, "library_gemms"):
            setattr(module, "library_gemms", backend == "auto")  # noqa: B010 (a bool on an nn.Module)
            count += 1
    return count
