"""Per-shape launch configs for the attention kernels: pure functions of host-known shapes (no autotune, no
device reads), so a CUDA graph captured for a batch-size bucket replays with the same grid.

Tile choices for Hopper (H200: 132 SMs, 227 KB shared memory per block, 64K registers per SM), from the sweep
in benchmarks/attention_kernels.py (numbers in docs/benchmarks.md, "Attention kernels"):
- decode is memory-bound: one program per (sequence, KV head, split) reads each page once for all the query
  heads that share the KV head; 64 keys (four 16-token pages) per iteration, 3 stages of cp.async in flight.
  Split-K (flash-decoding) only when B * Hk programs would not cover the GPU twice; with one split the
  kernel writes the output itself (no reduce launch).
- MLA decode at H = 128 is compute-heavy (~240 FLOP per latent byte): 64 heads per program so the dots use
  wgmma, 64 keys per iteration; the two head blocks of a (sequence, split) are adjacent in the grid, so the
  page comes from HBM once and from L2 for the other.
- prefill is compute-bound: 128 x 128 tiles, 8 warps, 3 stages (FA2-style); 128 x 64 for wide heads (Dk 192).
On CPU (TRITON_INTERPRET=1, the tests) tiles are 16 wide so that small shapes still cross tile boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

H200_SMS = 132
# TMA descriptors cost ~50 us of host time per eager launch (encoded on the host each call; 8 x 2,048 at 64-token
# pages: 90.9 us eager vs 38.6 with pointer loads, 34.8 vs 35.5 replayed from a CUDA graph, H200): eagerly only
# launches this large in key rows (batch x max length) take them, where the GPU time hides it (256 x 2,000:
# 509 vs 519 us); inside a graph capture always (the descriptors are encoded once, at capture).
TMA_EAGER_MIN_KEY_ROWS = 1 << 18
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    block_n: int  # keys per tile iteration
    num_splits: int  # split-K over the sequence
    num_warps: int
    num_stages: int
    block_h: int = 16  # MLA: query heads per program (GQA decode uses the KV group, padded to >= 16)
    q_in_loop: bool = False  # MLA: reload the query tile every key block instead of holding it in registers
    tma: bool = False  # MLA: read whole key tiles through TMA descriptors (needs block_n <= the page size)


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    block_m: int  # queries per program
    block_n: int  # keys per tile iteration
    num_warps: int
    num_stages: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H200_SMS


def choose_num_splits(programs: int, max_seq_len: int, device: torch.device) -> int:
    """Splits so that programs * splits covers the GPU ~2x, each split keeping >= MIN_KEYS_PER_SPLIT keys; none
    when the programs already come within 1/8 of two waves (MLA decode, H200, 2,000 keys: 128 sequences x 2 head
    blocks = 256 programs take 261 us unsplit vs 303 us + the reduce split in two; 96 sequences = 192 programs
    still gain from two splits, 231 vs 257 us)."""
    if device.type != "cuda":
        return 1 if max_seq_len <= 32 else 2
    target = 2 * _sm_count(device)
    if programs >= target - target // 8:
        return 1
    wanted = -(-target // max(programs, 1))
    by_length = max(1, max_seq_len // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def paged_decode_config(
    batch: int,
    kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    device: torch.device,
    num_splits: int | None = None,
) -> DecodeConfig:
    splits = num_splits or choose_num_splits(batch * kv_heads, max_seq_len, device)
    if device.type != "cuda":
        return DecodeConfig(block_n=16, num_splits=splits, num_warps=4, num_stages=1)
    block_n = 64 if head_dim <= 128 else 32
    return DecodeConfig(block_n=block_n, num_splits=splits, num_warps=4, num_stages=3)


def mla_decode_config(
    batch: int,
    heads: int,
    kv_lora_rank: int,
    max_seq_len: int,
    device: torch.device,
    num_splits: int | None = None,
    element_size: int = 2,
    block_size: int = 16,
    capturing: bool = False,
) -> DecodeConfig:
    """`capturing`: the launch is being captured into a CUDA graph (TMA's host cost is paid once there)."""
    if device.type != "cuda":
        splits = num_splits or choose_num_splits(batch, max_seq_len, device)
        return DecodeConfig(block_n=16, num_splits=splits, num_warps=4, num_stages=1, block_h=16)
    if element_size >= 4:
        # float32 (the correctness path): the bf16 tiling needs 311 KB of shared memory at 4 bytes per element
        # (H200 limit 227 KB, measured); 32 heads x 32 keys in one stage need ~150 KB
        block_h = max(16, min(32, triton_next_power_of_2(heads)))
        programs = batch * -(-heads // block_h)
        splits = num_splits or choose_num_splits(programs, max_seq_len, device)
        return DecodeConfig(block_n=32, num_splits=splits, num_warps=4, num_stages=1, block_h=block_h)
    # measured on H200 (docs/benchmarks.md, "Attention kernels" and "MLA decode over 64-token pages"): at
    # H = 128, 64 heads x 64 keys with 8 warps (two warpgroups sharing the 512-wide accumulator, wgmma); 16 warps,
    # 128 or 32 keys, splitting the latent columns over two programs and Triton's warp specialisation all lost.
    # 2026-12-01, 256 x 2,000: whole 64-token pages as one tile through TMA descriptors, 2 stages: 507.7 us
    # (pointer loads 518.2); 16-token pages, the query tile held in shared memory, 3 stages: 606.7 (was 636)
    wide = heads >= 64
    block_h = 64 if wide else max(16, triton_next_power_of_2(heads))
    programs = batch * -(-heads // block_h)
    splits = num_splits or choose_num_splits(programs, max_seq_len, device)
    if not wide:
        return DecodeConfig(block_n=32, num_splits=splits, num_warps=4, num_stages=2, block_h=block_h)
    whole_pages = block_size >= 64
    worth_tma = capturing or batch * max_seq_len >= TMA_EAGER_MIN_KEY_ROWS
    return DecodeConfig(
        block_n=64,
        num_splits=splits,
        num_warps=8,
        num_stages=2 if whole_pages else 3,
        block_h=block_h,
        tma=whole_pages and worth_tma and _has_tma(device),
    )


def _has_tma(device: torch.device) -> bool:
    """Tensor-memory-accelerator loads need Hopper or newer (a host query, answered from torch's cache)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def prefill_config(
    head_dim_k: int, head_dim_v: int, device: torch.device, element_size: int = 2
) -> PrefillConfig:
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if element_size >= 4:
        # float32 (the correctness path): the bf16 tiles need 295 KB of shared memory at 4 bytes per element for
        # MLA's Dk = 192 and overflow at D = 128 too (H200 limit 227 KB, measured); 64 x 32 tiles in two stages
        # need ~130 KB at Dk 192
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    # measured on H200: 128 x 128 tiles, 8 warps, 3 stages for D = 128 (402 TFLOP/s at 16k causal);
    # 128 x 64 for MLA's Dk = 192 (409 TFLOP/s)
    if max(head_dim_k, head_dim_v) <= 128:
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def triton_next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
