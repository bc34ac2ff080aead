"""When bf16 experts take torch's grouped GEMM (`kernels.grouped_mm.usable`): pure rules, checked on CPU.
The GEMM itself runs only on a GPU (tests/gpu/test_grouped_mm_gpu.py)."""

from __future__ import annotations

import torch
from moefleet.engine.kernels import grouped_mm


def test_usable_only_for_bf16_on_a_verified_cuda_device_with_aligned_widths(monkeypatch):
    w = torch.empty(4, 64, 32, dtype=torch.bfloat16)
    x = torch.empty(8, 32, dtype=torch.bfloat16)
    assert not grouped_mm.usable(w, x)  # CPU tensors
    assert not grouped_mm.device_ok(torch.device("cpu"))

    class _CudaLike:  # a stand-in with is_cuda and a device: the capability check is patched
        def __init__(self, dtype):
            self.is_cuda, self.dtype, self.device = True, dtype, torch.device("cuda", 0)

    monkeypatch.setattr(grouped_mm, "device_ok", lambda device: True)
    assert grouped_mm.usable(w, _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    assert not grouped_mm.usable(w, _CudaLike(torch.float32))  # type: ignore[arg-type]
    assert not grouped_mm.usable(w.float(), _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    unaligned = torch.empty(4, 64, 40, dtype=torch.bfloat16)
    assert not grouped_mm.usable(unaligned, _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
    monkeypatch.setattr(grouped_mm, "device_ok", lambda device: False)  # an unverified capability
    assert not grouped_mm.usable(w, _CudaLike(torch.bfloat16))  # type: ignore[arg-type]
