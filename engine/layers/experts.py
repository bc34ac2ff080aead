"""This rank's routed experts, stored stacked, and their grouped SwiGLU computation.

w13 [E_local, 2*I, D] holds gate (rows :I) and up (rows I:) projections; w2 [E_local, D, I] the down
projection. Only this rank's physical slots are allocated; `local_experts[s]` is the logical expert slot s
holds (any expert, several slots may hold the same one: EPLB replicas). The weight loader fills every slot
holding a checkpoint expert and silently skips the others, so one loader serves every placement. Tensors
with one row per slot (leading dim E_local) are what EPLB moves between ranks (`slot_tensors`).
Shape legend: N rows grouped by local expert, D hidden, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from moefleet.engine.kernels import fp8_cublas, grouped_mm
from moefleet.engine.layers.token_dispatch import HostCounts, counts_on_host
from torch import nn

SHARDS = ("gate", "up", "down")
# Padded batched matmul is used while E_local * max_count <= max(PAD_FACTOR * N, PAD_MIN_ROWS).
PAD_FACTOR = 4
PAD_MIN_ROWS = 4096
# FP8 experts on CUDA: per-expert cuBLAS blockwise FP8 GEMMs (kernels.fp8_cublas, host row counts) cost ~340 us
# of host time per expert (two F.scaled_mm calls, two quantiser launches) and run at ~930 TFLOP/s; the fused
# Triton kernel has no per-expert host cost but runs at ~530. cuBLAS wins once an expert's average work
# (rows x 6 D I flops) takes the Triton kernel longer than that host time: ~1.9e11 flops, i.e. ~2,100 rows per
# expert at DeepSeek-V3's D 7168, I 2048 (H200, benchmarks/fp8_experts_probe.py: 9 experts x 1,024 rows 3,084 us
# cuBLAS vs 1,480 Triton; x 4,096 rows 3,534 vs 6,180).
CUBLAS_MIN_FLOPS_PER_EXPERT = 1.9e11
# bf16 experts on CUDA: torch's grouped GEMM (kernels.grouped_mm) from this many rows per local expert on
# (prefill); decode keeps the fused Triton kernel, which won the one in-graph comparison (EP72 decode
# projection, H200: 1.519 vs 1.453 ms/layer with grouped_mm at 512 rows per expert; within run-to-run spread).
GROUPED_MM_MIN_ROWS_PER_EXPERT = 1024


def torch_path(tokens_per_expert: list[int], num_rows: int) -> str:
    """CPU path choice: "padded" (one batched matmul over rows padded to the busiest expert) while the padding
    stays small (decode, balanced prefill), else "loop" (one matmul per expert that has rows: skewed routing)."""
    padded_rows = len(tokens_per_expert) * max(tokens_per_expert, default=0)
    return "padded" if padded_rows <= max(PAD_FACTOR * num_rows, PAD_MIN_ROWS) else "loop"


class Experts(nn.Module):
    def __init__(self, local_experts: Sequence[int], hidden_size: int, intermediate_size: int):
        super().__init__()
        self.local_experts: list[int] = list(local_experts)  # logical expert of each local slot
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        num_local = len(local_experts)
        self.w13 = nn.Parameter(
            torch.empty(num_local, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, intermediate_size), requires_grad=False)
        self.w13.weight_loader = self._load_per_expert  # type: ignore[attr-defined]
        self.w2.weight_loader = self._load_per_expert  # type: ignore[attr-defined]
        self.loaded: set[tuple[int, str]] = set()  # (logical expert, shard) seen, for completeness checks
        # FP8 (set by `to_fp8`): w13/w2 in float8_e4m3fn with block scales w13_scale_inv/w2_scale_inv.
        self.block_shape: tuple[int, int] | None = None
        self.w13_scale_inv: torch.Tensor | None
        self.w2_scale_inv: torch.Tensor | None
        self.register_buffer("w13_scale_inv", None, persistent=False)
        self.register_buffer("w2_scale_inv", None, persistent=False)
        self.loaded_scales: set[tuple[int, str]] = set()
        # torch's library GEMMs (cuBLAS blockwise FP8 per expert, bf16 grouped_mm) where verified;
        # `gemm_backend.set_gemm_backend(model, "triton")` turns them off (side-by-side runs).
        self.library_gemms = True

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Store weights as float8_e4m3fn + per-(bo x bi)-tile scales (DeepSeek's format), before loading.

        w13_scale_inv [E_local, 2I/bo, ceil(D/bi)], w2_scale_inv [E_local, ceil(D/bo), ceil(I/bi)]; gate and
        up must not share a scale tile, so I must be a multiple of bo."""
        bo, bi = block
        inter, hidden = self.intermediate_size, self.hidden_size
        if inter % bo:
            raise ValueError(
                f"FP8 experts: moe intermediate size {inter} is not a multiple of the weight block rows {bo}; "
                "serve with --quantization none"
            )
        device, num_local = self.w13.device, self.w13.shape[0]
        fp8 = torch.float8_e4m3fn
        self.block_shape = (bo, bi)
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden, dtype=fp8, device=device), False)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter, dtype=fp8, device=device), False)
        self.w13.weight_loader = self._load_per_expert  # type: ignore[attr-defined]
        self.w2.weight_loader = self._load_per_expert  # type: ignore[attr-defined]
        f32 = torch.float32
        self.w13_scale_inv = torch.empty(
            num_local, 2 * inter // bo, -(-hidden // bi), dtype=f32, device=device
        )
        self.w2_scale_inv = torch.empty(
            num_local, -(-hidden // bo), -(-inter // bi), dtype=f32, device=device
        )

    def load_scale(self, expert_id: int, shard: str, scale: torch.Tensor) -> None:
        """Load `experts.{expert_id}.{shard}_proj.weight_scale_inv`; a no-op for non-local experts."""
        if expert_id not in self.local_experts:
            return
        if self.block_shape is None or self.w13_scale_inv is None or self.w2_scale_inv is None:
            raise ValueError(
                f"expert {expert_id} {shard}_proj has an FP8 scale but these experts are not FP8"
            )
        tiles = self.intermediate_size // self.block_shape[0]
        for local in self.slots_of(expert_id):
            targets = {
                "gate": self.w13_scale_inv[local, :tiles],
                "up": self.w13_scale_inv[local, tiles:],
                "down": self.w2_scale_inv[local],
            }
            if shard not in targets:
                raise ValueError(f"unknown expert shard {shard!r} (expected one of {SHARDS})")
            if targets[shard].shape != scale.shape:
                raise ValueError(
                    f"expert {expert_id} {shard}_proj scale has shape {tuple(scale.shape)}, "
                    f"expected {tuple(targets[shard].shape)}"
                )
            targets[shard].copy_(scale)
            self.loaded_scales.add((expert_id, shard))

    def _load_per_expert(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard: str) -> None:
        """Load checkpoint `experts.{expert_id}.{shard}_proj.weight` into every slot holding that expert."""
        for local in self.slots_of(expert_id):
            self._load_slot(local, loaded, expert_id, shard)

    def slots_of(self, expert_id: int) -> list[int]:
        """Local slots holding logical expert `expert_id` (empty when it lives on other ranks only)."""
        return [slot for slot, e in enumerate(self.local_experts) if e == expert_id]

    def slot_tensors(self) -> list[torch.Tensor]:
        """Tensors with one row per local slot: what moves when a slot changes expert (EPLB)."""
        tensors: list[torch.Tensor] = [self.w13, self.w2]
        if self.w13_scale_inv is not None and self.w2_scale_inv is not None:
            tensors += [
                self.w13_scale_inv,
                self.w2_scale_inv,
            ]  # FP8: the block scales move with their weights
        return tensors

    def _load_slot(self, local: int, loaded: torch.Tensor, expert_id: int, shard: str) -> None:
        inter = self.intermediate_size
        if shard == "gate":
            target = self.w13[local, :inter]
        elif shard == "up":
            target = self.w13[local, inter:]
        elif shard == "down":
            target = self.w2[local]
        else:
            raise ValueError(f"unknown expert shard {shard!r} (expected one of {SHARDS})")
        if target.shape != loaded.shape:
            raise ValueError(
                f"expert {expert_id} {shard}_proj has shape {tuple(loaded.shape)}, expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(loaded)
        self.loaded.add((expert_id, shard))

    def load_stacked(self, name: str, loaded: torch.Tensor) -> None:
        """Load transformers>=5 stacked tensors: `gate_up_proj` [E, 2I, D] or `down_proj` [E, D, I] (all experts)."""
        if name == "gate_up_proj":
            for local, expert_id in enumerate(self.local_experts):
                self._load_slot(local, loaded[expert_id, : self.intermediate_size], expert_id, "gate")
                self._load_slot(local, loaded[expert_id, self.intermediate_size :], expert_id, "up")
        elif name == "down_proj":
            for local, expert_id in enumerate(self.local_experts):
                self._load_slot(local, loaded[expert_id], expert_id, "down")
        else:
            raise ValueError(f"unknown stacked expert tensor {name!r}")

    def missing(self) -> list[str]:
        missing = [
            f"expert {e} {s}_proj"
            for e in sorted(set(self.local_experts))
            for s in SHARDS
            if (e, s) not in self.loaded
        ]
        if self.block_shape is not None:
            missing += [
                f"expert {e} {s}_proj.weight_scale_inv"
                for e in sorted(set(self.local_experts))
                for s in SHARDS
                if (e, s) not in self.loaded_scales
            ]
        return missing

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in float32 (FP8 experts) or as stored: what the CPU path multiplies with."""
        if self.block_shape is None:
            return self.w13, self.w2
        from moefleet.engine.kernels.fp8_blocks import dequantize_block

        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        return (
            dequantize_block(self.w13, self.w13_scale_inv, self.block_shape),
            dequantize_block(self.w2, self.w2_scale_inv, self.block_shape),
        )

    def forward(
        self,
        hidden: torch.Tensor,
        tokens_per_expert: list[int] | None = None,
        *,
        counts: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        expected_rows: int | None = None,
        host_sync_ok: bool = False,
        host_counts: HostCounts | None = None,
    ) -> torch.Tensor:
        """hidden [N, D] grouped by local expert -> [N, D] unweighted outputs.

        Rows per expert come either as a host list `tokens_per_expert` or as a device tensor `counts` [E_local]
        (no host synchronisation on CUDA). On CUDA bf16 experts with prefill-sized rows run torch's grouped
        GEMM where verified (`kernels.grouped_mm`), else the fused Triton kernel (`kernels.fused_moe`); on CPU
        a torch path that computes exactly what transformers computes per expert. The masked layout
        [E_local, C, D] (DeepEP low-latency) may be FP8 with `scales` [E_local, C, D / 128]: dequantised
        inside the expert GEMM, rows >= counts[e] never read; output bf16 [E_local, C, D].
        `host_sync_ok` (prefill-mode steps): device counts may be read on the host when that buys the faster
        per-expert GEMMs (`host_count_path`); never while a CUDA graph is being captured. `host_counts`: the
        dispatcher's copy of `counts` already on its way to the host (waited for instead of a new copy).
        """
        if tokens_per_expert is None and counts is None:
            raise ValueError("Experts.forward needs tokens_per_expert (host list) or counts (tensor)")
        if hidden.dim() == 3:  # masked layout [E_local, C, D] (DeepEP low-latency): rows >= counts[e] unused
            if counts is None or not hidden.is_cuda:
                raise ValueError(
                    "the masked expert layout [E_local, C, D] needs device counts on a CUDA tensor"
                )
            return self.forward_masked(hidden, counts, scales=scales, expected_rows=expected_rows)
        if scales is not None:
            raise ValueError("FP8 rows with scales come only in the masked layout [E_local, C, D]")
        if hidden.is_cuda:
            if self.host_count_path(hidden.device, hidden.shape[0]) and (
                tokens_per_expert is not None
                or (host_sync_ok and not torch.cuda.is_current_stream_capturing())
            ):
                if tokens_per_expert is None:
                    assert counts is not None
                    tokens_per_expert = counts_on_host(counts, host_counts)
                return self.forward_cublas_fp8(hidden, tokens_per_expert)
            if counts is None:
                counts = torch.tensor(tokens_per_expert, dtype=torch.int32).to(
                    hidden.device, non_blocking=True
                )
            if (
                self.block_shape is None
                and self.library_gemms
                and hidden.shape[0] >= GROUPED_MM_MIN_ROWS_PER_EXPERT * len(self.local_experts)
                and grouped_mm.usable(self.w13, hidden)
            ):
                return grouped_mm.experts(hidden, counts, self.w13, self.w2)
            return self.forward_fused(hidden, counts)
        if tokens_per_expert is None:
            assert counts is not None
            tokens_per_expert = [int(c) for c in counts.tolist()]
        if hidden.shape[0] == 0:
            return torch.empty_like(hidden)
        if torch_path(tokens_per_expert, hidden.shape[0]) == "padded":
            return self.forward_padded(hidden, tokens_per_expert)
        return self.forward_loop(hidden, tokens_per_expert)

    def quant_kwargs(self) -> dict[str, Any]:
        """The FP8 scales and block shape the fused kernels take (None for bf16 / fp32 weights)."""
        return {
            "w13_scale": self.w13_scale_inv,
            "w2_scale": self.w2_scale_inv,
            "block_shape": self.block_shape,
        }

    def host_count_path(self, device: torch.device, rows: int) -> bool:
        """Whether `rows` grouped rows go to per-expert cuBLAS blockwise FP8 GEMMs (which need host counts):
        FP8 experts with 128x128 blocks on a device where that GEMM is verified, and enough work per local
        expert on average to outweigh the per-expert host cost (CUBLAS_MIN_FLOPS_PER_EXPERT; prefill-sized
        batches; decode's few rows stay on the fused kernel)."""
        block = self.block_shape
        inter, hidden = self.intermediate_size, self.hidden_size
        flops_per_expert = rows / max(len(self.local_experts), 1) * 6 * hidden * inter
        return (
            block is not None
            and self.library_gemms
            and flops_per_expert >= CUBLAS_MIN_FLOPS_PER_EXPERT
            and fp8_cublas.shape_ok(2 * inter, hidden, block)
            and fp8_cublas.shape_ok(hidden, inter, block)
            and fp8_cublas.device_ok(device)
        )

    def forward_cublas_fp8(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        return fp8_cublas.experts(
            hidden, tokens_per_expert, self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv
        )

    def forward_fused(self, hidden: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from moefleet.engine.kernels.fused_moe import fused_experts_grouped

        return fused_experts_grouped(
            hidden,
            counts,
            self.w13,
            self.w2,
            **self.quant_kwargs(),
        )

    def forward_topk(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, D] in token order, topk_ids [T, K] local expert ids -> [T, D]: the routing-weighted sum of
        each token's experts, in one fused pass on CUDA (no permutation of the rows)."""
        from moefleet.engine.kernels.fused_moe import fused_experts_topk

        return fused_experts_topk(
            hidden,
            self.w13,
            self.w2,
            topk_ids,
            topk_weights,
            **self.quant_kwargs(),
        )

    def forward_masked(
        self,
        hidden: torch.Tensor,
        counts: torch.Tensor,
        *,
        scales: torch.Tensor | None = None,
        expected_rows: int | None = None,
    ) -> torch.Tensor:
        """Masked layout [E_local, C, D] (bf16, or FP8 rows with `scales` [E_local, C, D/128]) -> [E_local,
        C, D] in the activation dtype (bf16 for FP8 rows); rows >= counts[e] are neither read nor written."""
        from moefleet.engine.kernels.fused_moe import fused_experts_masked

        return fused_experts_masked(
            hidden,
            counts,
            self.w13,
            self.w2,
            x_scale=scales,
            expected_rows=expected_rows,
            **self.quant_kwargs(),
        )

    def forward_loop(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        w13, w2 = (w.to(hidden.dtype) for w in self.dequantized())
        out = torch.empty_like(hidden)
        start = 0
        for local, count in enumerate(tokens_per_expert):
            if count == 0:
                continue
            rows = hidden[start : start + count]
            gate, up = F.linear(rows, w13[local]).chunk(2, dim=-1)
            out[start : start + count] = F.linear(F.silu(gate) * up, w2[local])
            start += count
        return out

    def forward_padded(self, hidden: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # [N] -> (expert, position within the expert's rows), then [E_local, max_count, D] x w13^T ...
        counts = torch.tensor(tokens_per_expert, device=hidden.device)
        expert = torch.repeat_interleave(torch.arange(len(tokens_per_expert), device=hidden.device), counts)
        position = (
            torch.arange(hidden.shape[0], device=hidden.device) - (torch.cumsum(counts, 0) - counts)[expert]
        )
        padded = hidden.new_zeros(len(tokens_per_expert), max(tokens_per_expert), hidden.shape[1])
        padded[expert, position] = hidden
        w13, w2 = (w.to(hidden.dtype) for w in self.dequantized())
        gate, up = torch.bmm(padded, w13.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))
        return out[expert, position]
