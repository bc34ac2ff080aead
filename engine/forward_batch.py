"""ForwardBatch: everything one model step needs besides the weights, passed explicitly down the model.

`model(input_ids, positions, batch)` -> `DecoderLayer(positions, hidden, batch)` -> attention reads the batch
(nothing module-global: two batches can be alive and used at once, e.g. the two micro-batches of TBO).
`ForwardBatch.build` turns host lists into device tensors with one pinned host->device copy (no sync); the
CUDA-graph runner copies a decode batch into its own static buffers (cuda_graph_runner.py).

Per-step values derived from the batch (attention backend metadata, rotary cos/sin, slot rows) are memoised
in `batch.derived`, so they are computed by the first layer of the step and shared by the rest.
Shape legend: T new tokens (all sequences concatenated), B sequences, M max blocks per sequence,
S sampled rows.
"""

from __future__ import annotations

import array
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from moefleet.engine.attention.backend import AttentionBackend

T = TypeVar("T")


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # every sequence computes a prompt (chunk) of more than one token
    DECODE = "decode"  # every sequence computes one token
    MIXED = "mixed"  # both kinds in one step
    IDLE = "idle"  # no tokens (an idle data-parallel rank that still runs the forward)

    @staticmethod
    def of(query_lens: Sequence[int]) -> ForwardMode:
        if not query_lens:
            return ForwardMode.IDLE
        extend = any(q > 1 for q in query_lens)
        decode = any(q == 1 for q in query_lens)
        if extend and decode:
            return ForwardMode.MIXED
        return ForwardMode.EXTEND if extend else ForwardMode.DECODE


@dataclass(eq=False)
class ForwardBatch:
    """One model step. Host lists and device tensors describe the same sequences, in the same order.

    Sequence b computes tokens [seq_lens[b] - query_lens[b], seq_lens[b]); its new tokens are rows
    cu_query_lens[b]:cu_query_lens[b + 1] of the step.
    """

    mode: ForwardMode
    block_size: int
    # Host copies (the scheduler's view; never read back from the device).
    query_lens: list[int]
    seq_lens: list[int]  # KV length after this step (cached + new)
    # Device tensors.
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 flat KV slot (block * block_size + offset); -1 = do not write
    query_lens_t: torch.Tensor  # [B] int32
    seq_lens_t: torch.Tensor  # [B] int32
    cu_query_lens: torch.Tensor  # [B + 1] int32
    block_tables: torch.Tensor  # [B, M] int32, padded with -1
    sample_indices: torch.Tensor  # [S] int64 rows whose logits are sampled
    # Host copy of block_tables for host-side metadata builders (the torch reference backend).
    block_tables_cpu: torch.Tensor  # [B, M] int64
    # Group-agreed mode of a data-parallel step (any rank prefilling); None alone. Dispatch picks
    # normal vs low-latency from it; attention decides per row from query_lens.
    dp_is_prefill: bool | None = None
    attn_backend: AttentionBackend | None = None
    # A padded decode batch over a CUDA graph's static buffers: kernels must size launches from host
    # shapes only (never from the host lists, which are placeholders at capture).
    for_cuda_graph: bool = False
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    # ---- sizes ---------------------------------------------------------------------------------------

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens, default=0)

    @property
    def context_lens(self) -> list[int]:
        """Alias of seq_lens (the name the old ForwardContext used)."""
        return self.seq_lens

    @property
    def is_prefill(self) -> bool:
        """Prefill path for the step as a whole: the group's agreed mode, else any sequence extending."""
        if self.dp_is_prefill is not None:
            return self.dp_is_prefill
        return self.mode in (ForwardMode.EXTEND, ForwardMode.MIXED)

    @property
    def backend(self) -> AttentionBackend:
        if self.attn_backend is None:
            from moefleet.engine.attention.torch_backend import TorchAttentionBackend

            self.attn_backend = TorchAttentionBackend()
        return self.attn_backend

    def memo(self, key: Any, build: Callable[[], T]) -> T:
        """`build()` once per step (per key); later calls of the same step reuse the value."""
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]  # type: ignore[no-any-return]

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        input_ids: Sequence[int],
        positions: Sequence[int],
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
        slot_mapping: Sequence[int] | None = None,
        sample_indices: Sequence[int] | None = None,
        attn_backend: AttentionBackend | None = None,
        dp_is_prefill: bool | None = None,
    ) -> ForwardBatch:
        """Pack the host lists into one (pinned) int64 tensor, copy it to the device once, slice views.

        `slot_mapping` defaults to the slots of each sequence's new tokens from its block table;
        `sample_indices` to each sequence's last new token.
        """
        device = torch.device(device)
        query_lens, seq_lens = list(query_lens), list(seq_lens)
        num_seqs, num_tokens = len(query_lens), len(input_ids)
        check_lens(query_lens, seq_lens, num_tokens, len(positions))
        if len(block_tables) != num_seqs:
            raise ValueError(f"block_tables has {len(block_tables)} rows for {num_seqs} sequences")
        width = max((len(t) for t in block_tables), default=0)
        if slot_mapping is None:
            check_tables(seq_lens, block_tables, block_size)
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        if sample_indices is None:
            sample_indices = [c - 1 for c in cu[1:]]
        # One host buffer: [ids T | positions T | samples S | (slots T) | query_lens B | seq_lens B | cu B+1 |
        # block tables B*M]; the part after the first three (four) is converted to int32 on the device.
        head: list[Sequence[int]] = [input_ids, positions, sample_indices]
        if slot_mapping is not None:
            head.append(slot_mapping)
        tail: list[Sequence[int]] = [query_lens, seq_lens, cu]
        head_sizes, tail_sizes = [len(p) for p in head], [len(p) for p in tail]
        table_size = num_seqs * width
        flat: list[int] = []
        for part in (*head, *tail):
            flat.extend(part)
        for table in block_tables:
            flat.extend(table)
            flat.extend([-1] * (width - len(table)))
        # One conversion for the whole step (array -> tensor is ~5x faster than torch.tensor on a list).
        host = (
            torch.frombuffer(array.array("q", flat), dtype=torch.int64)
            if flat
            else torch.empty(0, dtype=torch.int64)
        )
        if device.type == "cuda":
            host = host.pin_memory()
        host_tables = host[len(flat) - table_size :].view(num_seqs, width)
        dev = host.to(device, non_blocking=True)
        head_t = dev[: sum(head_sizes)].split(head_sizes)
        qlens, slens, cu_t, tables_t = dev[sum(head_sizes) :].to(torch.int32).split([*tail_sizes, table_size])
        ids, pos, samples = head_t[0], head_t[1], head_t[2]
        tables_t = tables_t.view(num_seqs, width)
        if slot_mapping is not None:
            slots = head_t[3]
        else:  # on the device: table[p // block_size] * block_size + p % block_size for every new token
            seq = torch.repeat_interleave(
                torch.arange(num_seqs, device=device), qlens.long(), output_size=num_tokens
            )
            slots = tables_t.long()[seq, pos // block_size] * block_size + pos % block_size
        return cls(
            mode=ForwardMode.of(query_lens),
            block_size=block_size,
            query_lens=query_lens,
            seq_lens=seq_lens,
            input_ids=ids,
            positions=pos,
            slot_mapping=slots,
            query_lens_t=qlens,
            seq_lens_t=slens,
            cu_query_lens=cu_t,
            block_tables=tables_t,
            sample_indices=samples,
            block_tables_cpu=host_tables,
            dp_is_prefill=dp_is_prefill,
            attn_backend=attn_backend,
        )

    @classmethod
    def prefill_without_cache(
        cls, lens: Sequence[int], device: torch.device | str, attn_backend: AttentionBackend | None = None
    ) -> ForwardBatch:
        """Whole prompts of `lens` tokens attending within the step (no KV cache: warm-up, reference runs)."""
        return cls.build(
            input_ids=[0] * sum(lens),
            positions=[p for n in lens for p in range(n)],
            query_lens=lens,
            seq_lens=lens,
            block_tables=[[] for _ in lens],
            block_size=1,
            slot_mapping=[-1] * sum(lens),
            device=device,
            attn_backend=attn_backend,
        )


def check_lens(query_lens: list[int], seq_lens: list[int], num_tokens: int, num_positions: int) -> None:
    if len(query_lens) != len(seq_lens):
        raise ValueError(f"query_lens ({len(query_lens)}) and seq_lens ({len(seq_lens)}) differ in length")
    if any(not 1 <= q <= s for q, s in zip(query_lens, seq_lens, strict=True)):
        raise ValueError(f"need 1 <= query_len <= seq_len per sequence, got {query_lens} / {seq_lens}")
    if sum(query_lens) != num_tokens or num_positions != num_tokens:
        raise ValueError(
            f"query_lens sum to {sum(query_lens)} but the step has {num_tokens} input ids and "
            f"{num_positions} positions"
        )


def check_tables(seq_lens: list[int], block_tables: Sequence[Sequence[int]], block_size: int) -> None:
    """Every sequence's table covers its seq_len (slots are then computed on the device)."""
    for s, table in zip(seq_lens, block_tables, strict=True):
        if len(table) * block_size < s:
            raise ValueError(
                f"a sequence of {s} tokens has only {len(table)} KV blocks of {block_size} in its block table"
            )
