"""Forward metadata for one model step, set by the model runner and read by attention layers.

It travels in one context object instead of through every `forward` signature (nano-vllm style).
Shape legend: T new tokens in the step (all sequences concatenated), B sequences, M max blocks per sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardContext:
    # True when any sequence in the step computes more than one new token (prompt or prompt chunk).
    is_prefill: bool
    # New tokens per sequence, and KV length per sequence after this step (cached + new), both [B].
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    # Flat KV slot (block * block_size + offset) each new token's K/V is written to, [T]; -1 = skip.
    slot_mapping: torch.Tensor | None = None
    # Physical KV blocks of each sequence, [B, M], padded with -1.
    block_tables: torch.Tensor | None = None
    block_size: int = 16
    # Values the layers derive from this metadata, computed by the first layer of the step and shared by
    # the rest (e.g. attention's padded index maps), keyed by their builder.
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens))


_current: ForwardContext | None = None


def get_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError(
            "no forward context is set: run the model through ModelRunner (use forward_context())"
        )
    return _current


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous
