"""Forward batches the TBO tests share (built on CPU for an engine's model runner)."""

from __future__ import annotations

from typing import Any

from moefleet.engine.forward_batch import ForwardBatch


def three_prompts(runner: Any) -> ForwardBatch:
    """Three fresh 5-token prompts (cost 15 each): the TBO cut is 3 tokens into the 2nd."""
    return ForwardBatch.build(
        input_ids=list(range(3, 18)),
        positions=[p for _ in range(3) for p in range(5)],
        query_lens=[5, 5, 5],
        seq_lens=[5, 5, 5],
        block_tables=[[0], [1], [2]],
        block_size=runner.block_size,
        device="cpu",
        attn_backend=runner.attn_backend,
    )
