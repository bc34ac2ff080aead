"""EngineConfig: every knob of one engine instance, validated once at construction.

The model's own limits (max_position_embeddings) come from its HF `config.json`, read here so a bad
setting fails before any weight is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "fp8")  # see fp8_weights.py
ATTENTION_BACKENDS = ("auto", "torch", "triton")
CUDA_GRAPH_MODES = ("auto", "on", "off")  # see cuda_graph_runner.decide_cuda_graphs
TBO_MODES = ("auto", "on", "off")  # two-batch overlap, see tbo.py
# Without an explicit max_model_len we take the checkpoint's max_position_embeddings, but no more than this:
# very long defaults (128k+) would make every request's worst case reserve a huge share of the KV pool.
DEFAULT_MAX_MODEL_LEN_CAP = 32768
DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2
DEFAULT_BLOCK_SIZE = 16
MLA_CUDA_BLOCK_SIZE = 64


@dataclass(slots=True)
class EngineConfig:
    """Configuration of one engine (one rank). `model` is a directory holding an HF-format checkpoint."""

    model: str
    device: str = "cpu"
    # None: bfloat16 on CUDA, float32 on CPU.
    dtype: str | None = None
    # Weights: "auto" = what the checkpoint has (block-FP8 stays FP8), "none" = dequantize, "fp8" = quantize.
    quantization: str = "auto"
    max_num_seqs: int = 256
    # Token budget of one step: prompt chunks + decodes together (chunked prefill).
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    # KV page size in tokens. None: 64 for MLA models on CUDA (the MLA decode kernel reads whole 64-token pages
    # as one tile, ~20% faster than 16-token pages on H200, docs/benchmarks.md), else 16.
    block_size: int | None = None
    # KV pool size: explicit block count wins; else a memory budget. CUDA: the fraction of the GPU's memory
    # this engine may use in all (weights + activations of the largest step + KV cache); CPU: bytes.
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.85
    kv_cache_bytes: int | None = None
    seed: int = 0
    # "auto": triton on CUDA (when its kernels import), torch (padded-SDPA reference) elsewhere.
    attention_backend: str = "auto"
    # "auto": capture decode steps in CUDA graphs on CUDA with a backend that supports them; "off": eager.
    cuda_graphs: str = "auto"
    # Two-batch overlap: "on", "off", or "auto" (on from a measured per-mode token count; none measured yet).
    tbo: str = "auto"
    hf_config: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        config_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(
                f"model ({self.model!r}) has no config.json: pass a directory holding an HF-format checkpoint"
            )
        with open(config_path) as f:
            self.hf_config = json.load(f)
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device ({self.device!r}) must be one of {DEVICES} (optionally 'cuda:N')")
        if self.dtype is None:
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) must be one of {DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization ({self.quantization!r}) must be one of {QUANTIZATIONS}")
        if self.block_size is None:
            mla = self.hf_config.get("kv_lora_rank") is not None
            self.block_size = (
                MLA_CUDA_BLOCK_SIZE if mla and self.device.startswith("cuda") else DEFAULT_BLOCK_SIZE
            )
        _require_positive(self, "max_num_seqs", "max_num_batched_tokens", "block_size")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode in one step"
            )
        max_positions = int(self.hf_config.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN_CAP))
        if self.max_model_len is None:
            self.max_model_len = min(max_positions, DEFAULT_MAX_MODEL_LEN_CAP)
        elif not 1 <= self.max_model_len <= max_positions:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) must be in [1, {max_positions}] "
                "(the model's max_position_embeddings)"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(
                f"num_kv_blocks ({self.num_kv_blocks}) must be >= 1 (or None to size from memory)"
            )
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction ({self.kv_cache_memory_fraction}) must be in (0, 1]")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes ({self.kv_cache_bytes}) must be >= 1 (or None for the default)")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend ({self.attention_backend!r}) must be one of {ATTENTION_BACKENDS}"
            )
        if self.attention_backend == "triton" and (
            self.block_size < 16 or self.block_size & (self.block_size - 1)
        ):
            raise ValueError(
                f"block_size ({self.block_size}) must be a power of two >= 16 for attention_backend 'triton' "
                "(its kernels read whole pages): raise block_size or use attention_backend 'torch'"
            )
        if self.cuda_graphs not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graphs ({self.cuda_graphs!r}) must be one of {CUDA_GRAPH_MODES}")
        if self.tbo not in TBO_MODES:
            raise ValueError(f"tbo ({self.tbo!r}) must be one of {TBO_MODES}")
        if self.kv_cache_bytes is None and self.device == "cpu":
            self.kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES

    @property
    def max_blocks_per_seq(self) -> int:
        assert self.max_model_len is not None and self.block_size is not None
        return -(-self.max_model_len // self.block_size)


def _require_positive(config: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
