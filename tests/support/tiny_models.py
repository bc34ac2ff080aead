"""Tiny random checkpoints for tests, one per NAMED config, cached on disk by content hash.

    from support.tiny_models import tiny_model_dir, TINY_CONFIGS
    path = tiny_model_dir("qwen3_norm_topk")          # created once, reused across tests and sessions

Also `PagedDriver`: a minimal paged-KV driver (block tables -> ForwardBatch) that runs a
moefleet model for prefill / chunked prefill / decode steps without the engine, for model-level tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moefleet.engine import tiny_model
from moefleet.engine.forward_batch import ForwardBatch

# name -> (arch, config overrides, make_tiny_model kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # Qwen3-MoE, renormalised top-k, every layer sparse.
    "qwen3_norm_topk": ("qwen3_moe", {"norm_topk_prob": True}, {}),
    # Qwen3-MoE without renormalisation; layers 1 and 3 would be sparse (step 2) but 3 is mlp-only;
    # tied embeddings; sharded safetensors.
    "qwen3_sparse_step": (
        "qwen3_moe",
        {
            "norm_topk_prob": False,
            "num_hidden_layers": 4,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
            "tie_word_embeddings": True,
        },
        {"shards": 2},
    ),
    # DeepSeek-V3: grouped top-k (4 groups, 2 chosen), q_lora_rank set, one dense layer, MTP layer skipped;
    # every MLA dim >= 16 so that on a GPU the Triton MLA kernels (tensor-core dots need K >= 16) and CUDA
    # graphs run on it (deepseek_yarn keeps rope dim 8: the reference-path fallback).
    "deepseek_grouped": (
        "deepseek_v3",
        {"n_group": 4, "topk_group": 2, "q_lora_rank": 48, "qk_rope_head_dim": 16},
        {},
    ),
    # DeepSeek-V3 / Kimi-K2 style: q_lora_rank null, one group, two shared experts, yarn rope with
    # mscale != mscale_all_dim (so both the rotary attention factor and the softmax scale matter).
    "deepseek_yarn": (
        "deepseek_v3",
        {
            "q_lora_rank": None,
            "n_group": 1,
            "topk_group": 1,
            "n_shared_experts": 2,
            "first_k_dense_replace": 1,
            "max_position_embeddings": 1024,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        },
        {"shards": 2},
    ),
    # GLM-4.5: grouped sigmoid top-k (4 groups, 3 chosen) + correction bias, one shared expert, one dense
    # first layer, q/k norm, q/k/v bias, half the head rotated (partial_rotary_factor 0.5), MTP layer skipped.
    "glm4_grouped": ("glm4_moe", {"topk_group": 3}, {}),
    # GLM-4.5-Air style flat routing: one group, every layer MoE, two shared experts, no q/k norm or bias,
    # a quarter of the head rotated, no renormalisation; sharded safetensors.
    "glm4_flat": (
        "glm4_moe",
        {
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "n_shared_experts": 2,
            "use_qk_norm": False,
            "attention_bias": False,
            "partial_rotary_factor": 0.25,
            "norm_topk_prob": False,
        },
        {"shards": 2},
    ),
    # gpt-oss: sliding window of 5 (shorter than the test prompts) then full attention, sinks, yarn RoPE,
    # top-2 of 8 experts with biases and the clamped SwiGLU.
    "gpt_oss_sliding": ("gpt_oss", {"sliding_window": 5}, {}),
    # gpt-oss: full attention first, then two sliding layers of window 7, top-3 of 4 experts, plain RoPE, no
    # attention bias, tied embeddings. The clamp bites through large gate_up weights (expert_gain 5: ~1/10 of
    # the gate/up values pass 7), not a low swiglu_limit: transformers before 5.2x hard-codes limit 7.0 and
    # alpha 1.702 (ignoring config.json), so the config states exactly those and every version agrees.
    "gpt_oss_full_first": (
        "gpt_oss",
        {
            "num_hidden_layers": 3,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
            "sliding_window": 7,
            "num_local_experts": 4,
            "num_experts_per_tok": 3,
            "swiglu_limit": 7.0,
            "swiglu_alpha": 1.702,
            "attention_bias": False,
            "rope_scaling": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": True,
        },
        {"expert_gain": 5.0},
    ),
    # Llama-4 (Maverick style): MoE every 2nd layer with dense layers between, chunks of 8 tokens (shorter
    # than the prompts) on RoPE layers, layer 3 a global NoPE layer with temperature tuning (floor_scale 4),
    # q/k L2 norm, llama3 RoPE scaling.
    "llama4_chunked": ("llama4", {}, {}),
    # Llama-4 (Scout style): every layer MoE, no chunking, no q/k norm, NoPE every 2nd layer without
    # temperature tuning, plain RoPE. No chunking is stated by layer_types (all full_attention), not by
    # attention_chunk_size null: transformers 5.17 derives chunked layers from no_rope_layers alone and then
    # fails on a null chunk size (its cache and mask need one); our config parser covers the null case
    # (tests/engine/test_models_emerging.py::test_config_defaults_follow_transformers).
    "llama4_all_moe": (
        "llama4",
        {
            "num_hidden_layers": 2,
            "interleave_moe_layer_step": 1,
            "no_rope_layers": [1, 0],
            "layer_types": ["full_attention", "full_attention"],
            "use_qk_norm": False,
            "attn_temperature_tuning": False,
            "rope_scaling": None,
        },
        {},
    ),
}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one CPU thread: tiny ops on a busy 2-core machine are ~10x faster than with 2 threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cache_root() -> Path:
    return Path(
        os.environ.get("MOEFLEET_TINY_MODEL_CACHE", Path(tempfile.gettempdir()) / "moefleet-tiny-models")
    )


def _key(arch: str, overrides: dict, kwargs: dict, seed: int) -> str:
    # The generator's source is part of the key so a changed initialisation never reuses stale files.
    source = Path(tiny_model.__file__).read_bytes()
    blob = json.dumps([arch, overrides, kwargs, seed], sort_keys=True).encode() + source
    return hashlib.sha256(blob).hexdigest()[:16]


def tiny_model_dir(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """Path of the tiny checkpoint for a named config, creating it (atomically) on first use."""
    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny config {name!r} (known: {', '.join(TINY_CONFIGS)})")
    arch, overrides, kwargs = TINY_CONFIGS[name]
    root = root or _cache_root()
    path = root / f"{name}-{_key(arch, overrides, kwargs, seed)}"
    if (path / "config.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    tiny_model.make_tiny_model(arch, staging, seed=seed, **kwargs, **overrides)
    try:
        staging.rename(path)
    except OSError:  # another process won the race: its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return path


@dataclass
class PagedDriver:
    """Runs a model over a paged KV cache the way the engine does, for tests.

    Blocks are handed out in a shuffled order so block tables are not contiguous.
    """

    model: torch.nn.Module
    num_blocks: int = 256
    block_size: int = 4
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # None: the torch reference backend; pass a TritonAttentionBackend to drive the Triton kernels.
    attn_backend: Any = None
    tables: dict[int, list[int]] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in self.model.attention_layers():  # type: ignore[operator]
            shape = layer.kv_cache_shape(self.num_blocks, self.block_size)
            layer.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.free = list(range(self.num_blocks))
        random.Random(0).shuffle(self.free)

    def batch(self, chunks: list[tuple[int, list[int]]]) -> ForwardBatch:
        """The ForwardBatch feeding `chunks` [(seq_id, new token ids)]; grows block tables and lengths."""
        input_ids, positions, query_lens, seq_lens = [], [], [], []
        for seq_id, tokens in chunks:
            start = self.lengths.get(seq_id, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq_id, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            input_ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.lengths[seq_id] = end
        return ForwardBatch.build(
            input_ids=input_ids,
            positions=positions,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=[self.tables[seq_id] for seq_id, _ in chunks],
            block_size=self.block_size,
            device=self.device,
            attn_backend=self.attn_backend,
        )

    def step(self, chunks: list[tuple[int, list[int]]], all_logits: bool = False) -> torch.Tensor:
        """Feed `chunks` [(seq_id, new token ids)] in one forward.

        Returns logits [B, V] of each chunk's last token (or [T, V] for every token with `all_logits`).
        """
        batch = self.batch(chunks)
        with torch.no_grad():
            hidden = self.model(batch.input_ids, batch.positions, batch)
            if not all_logits:
                hidden = hidden[batch.sample_indices]
            return self.model.compute_logits(hidden)  # type: ignore[operator]

    def generate(
        self, prompts: dict[int, list[int]], max_new_tokens: int, prefill_chunks: int = 1
    ) -> dict[int, list[int]]:
        """Greedy decoding of several sequences batched together; prompts prefilled in `prefill_chunks` steps."""
        out: dict[int, list[int]] = {s: [] for s in prompts}
        for c in range(prefill_chunks):
            chunks = []
            for seq_id, prompt in prompts.items():
                size = -(-len(prompt) // prefill_chunks)
                piece = prompt[c * size : (c + 1) * size]
                if piece:
                    chunks.append((seq_id, piece))
            logits = self.step(chunks)
            for (seq_id, _), row in zip(chunks, logits, strict=True):
                if self.lengths[seq_id] == len(prompts[seq_id]):
                    out[seq_id].append(int(row.argmax()))
        while any(len(v) < max_new_tokens for v in out.values()):
            chunks = [(s, [v[-1]]) for s, v in out.items() if len(v) < max_new_tokens]
            logits = self.step(chunks)
            for (seq_id, _), row in zip(chunks, logits, strict=True):
                out[seq_id].append(int(row.argmax()))
        return out
