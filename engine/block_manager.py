"""Paged KV cache bookkeeping: a fixed pool of blocks of `block_size` token slots (no torch).

A sequence's block table lists the physical blocks holding its tokens in order; token i lives in slot
`block_table[i // block_size] * block_size + i % block_size`. Blocks are handed out lazily, as a
sequence's computed length grows (prompt chunk by chunk, then one decode token at a time).
Blocks are reference counted: `share` lets a sequence start with another's full prompt blocks (the n > 1
choices of one request). Shared blocks are only ever full blocks of the common prompt, which nobody writes
again, so no copy-on-write is needed; each sharer writes its own blocks from the first unshared token on.
A block returns to the pool when its last holder frees it.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO reuse keeps recently freed blocks cold for a while, which makes use-after-free bugs visible.
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its first `num_tokens` tokens have a slot."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens (a no-op if it already does)."""
        needed = self.num_new_blocks(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {seq!r} needs {needed} blocks, {len(self._free)} free")
        for _ in range(needed):
            block = self._free.popleft()
            self._refs[block] = 1
            seq.block_table.append(block)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq`'s (empty) block table with `blocks`, full blocks of cached tokens another sequence holds."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks; only an empty block table can share")
        for block in blocks:
            if self._refs[block] < 1:
                raise RuntimeError(f"block {block} is free; only blocks in use can be shared")
            self._refs[block] += 1
        seq.block_table.extend(blocks)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks (unshared ones return to the pool); its cached tokens are gone
        (recompute if resumed)."""
        for block in seq.block_table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        seq.block_table.clear()
        seq.num_cached_tokens = 0
