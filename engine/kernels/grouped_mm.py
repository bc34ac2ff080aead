"""bf16 expert GEMMs on torch's grouped GEMM (`torch._grouped_mm`, CUTLASS on SM90): row offsets stay on the
device, so the step needs no host sync and captures into a CUDA graph like the fused Triton kernel.

Data flow (hidden [N, D] grouped by local expert, counts [E] on device):
    offs = cumsum(counts) (int32) -> grouped_mm(hidden, w13^T per expert) [N, 2I] -> silu(gate) * up [N, I]
      -> grouped_mm(., w2^T per expert) [N, D]; rows past offs[-1] (padding) are left undefined, as the fused
      kernel leaves them (every combine reads only valid rows).
Measured on H200 against the Triton fused kernel: eager 20.0 vs 21.6 ms at EP32 prefill (9 experts x 14.6k
rows, benchmarks/fp8_experts_probe.py); at EP72 decode (4 x 512 rows) eager timing favoured it (304 vs 351 us)
but inside the decode step's CUDA graph it lost in the one run that compared it (1.519 vs 1.453 ms per layer,
within the run-to-run spread measured later), so `Experts` uses it from GROUPED_MM_MIN_ROWS_PER_EXPERT rows
per expert only until a repeated decode measurement says otherwise. `usable`: bf16 weights, SM90, torch with the op,
16-element-aligned widths; FP8 and float32 experts keep their paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VERIFIED_CAPABILITIES = ((9, 0),)


def device_ok(device: torch.device) -> bool:
    """CUDA device of a verified compute capability, torch with the op."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(device) in VERIFIED_CAPABILITIES
    )


def usable(weight: torch.Tensor, hidden: torch.Tensor) -> bool:
    """bf16 weights and activations on a CUDA device of a verified capability, widths multiples of 16."""
    if not hidden.is_cuda or weight.dtype != torch.bfloat16 or hidden.dtype != torch.bfloat16:
        return False
    if weight.shape[-1] % 16 or weight.shape[-2] % 16:
        return False
    return device_ok(hidden.device)


def experts(hidden: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """hidden [N, D] grouped by expert, counts [E] (device) -> unweighted SwiGLU outputs [N, D] (bf16)."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gate_up = torch._grouped_mm(hidden.contiguous(), w13.transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
