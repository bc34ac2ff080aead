"""When bf16 experts take torch's grouped GEMM (`kernels.grouped_mm.usable`): pure rules, checked on CPU.
The GEMM itself runs only on a GPU (tests/gpu/test_grouped_mm_gpu.py)."""

from __future__ import annotations

import torch
from moefleet.engine.kernels import grouped_mm


def test_usable_only_for_bf16_on_cuda_with_aligned_widths(monkeypatch):
    w = torch.empty(4, 64, 32, dtype=torch.bfloat16)
    x = torch.empty(8, 32, dtype=torch.bfloat16)
    assert not grouped_mm.usable(w, x)  # CPU tensors

    class _CudaLike:  # a stand-in with is_cuda and a device index: the capability lookup is patched
        def __init__(self, dtype):
            self.is_cuda, self.dtype, self.device = True, dtype, torch.device("cuda", 0)

    monkeypatch.setattr(grouped_mm, "_DEVICE_OK", {0: True})
    assert grouped_mm.usable(w, _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    assert not grouped_mm.usable(w, _CudaLike(torch.float32))  # type: ignore[arg-type]
    assert not grouped_mm.usable(w.float(), _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    assert not grouped_mm.usable(torch.empty(4, 64, 40, dtype=torch.bfloat16), _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    grouped_mm.set_enabled(False)
    try:
        assert not grouped_mm.usable(w, _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    finally:
        grouped_mm.set_enabled(True)
    monkeypatch.setattr(grouped_mm, "_DEVICE_OK", {0: False})  # an unverified capability
    assert not grouped_mm.usable(w, _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
