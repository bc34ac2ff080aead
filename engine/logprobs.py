"""Logprobs of sampled and prompt tokens, computed on device for the sequences that asked (no cost otherwise).

Values are the model's raw distribution: log_softmax of the float32 logits before anything the sampler or
the request changes (temperature, top-k/top-p, min_tokens bans, grammar masks), as OpenAI documents them.
Each step costs one device->host copy of [R, 1 + 2k] numbers for the R rows that asked.

Prompt logprobs: the hidden state at position p gives the logits of token p + 1, so a prefill chunk over
positions [start, end) yields the logprobs of prompt tokens start + 1 .. end (the last prompt position's
logits predict the first output token instead). The first prompt token has none. Rows are pushed through
the LM head in slices of `PROMPT_ROWS_PER_SLICE` to bound the [rows, V] float32 buffer.

Shape legend: R rows that asked, V vocabulary, K most top alternatives asked in the step.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from .sampling_params import RequestOutput, TokenLogprob
from .sequence import Sequence

PROMPT_ROWS_PER_SLICE = 256


@dataclass(slots=True)
class PendingLogprobs:
    """Raw logprobs of the sampling rows that asked, saved before the logits are masked or scaled."""

    rows: list[int]  # indices into the step's sampling sequences
    logprobs: torch.Tensor  # [R, V] float32


def save_sampled(logits: torch.Tensor, seqs: Seq[Sequence]) -> PendingLogprobs | None:
    """Before sampling: log_softmax of the rows whose request asked for logprobs (a copy; the sampler may
    change `logits` in place afterwards)."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    return PendingLogprobs(rows, logits.index_select(0, index).float().log_softmax(dim=-1))


def record_sampled(pending: PendingLogprobs | None, seqs: Seq[Sequence], tokens: list[int]) -> None:
    """After sampling: set `seq.new_logprob` of every row that asked (the sampled token's logprob + top-k)."""
    if pending is None:
        return
    chosen = torch.tensor([tokens[r] for r in pending.rows], device=pending.logprobs.device)
    ks = [int(seqs[r].params.logprobs or 0) for r in pending.rows]
    for seq, token, entry in zip(
        [seqs[r] for r in pending.rows], chosen.tolist(), _gather(pending.logprobs, chosen, ks), strict=True
    ):
        seq.new_logprob = TokenLogprob(token, *entry)


def record_prompt(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, chunks: Seq[Any]
) -> None:
    """Append prompt logprobs for every scheduled chunk (`seq`, `start`, `num_new_tokens`) of the step whose
    sequence asked. `hidden` [T, D] holds the step's rows in chunk order (what the model returned)."""
    row_index: list[int] = []
    targets: list[int] = []
    owners: list[tuple[Sequence, int]] = []  # (seq, number of rows) in row order
    offset = 0
    for chunk in chunks:
        seq, start, num_new = chunk.seq, chunk.start, chunk.num_new_tokens
        if seq.prompt_logprobs is not None:
            # Positions [first, last) give prompt tokens first + 1 .. last; skip those already recorded
            # (a preempted sequence recomputes its prompt).
            first = max(start, len(seq.prompt_logprobs) - 1)
            last = min(start + num_new, seq.num_prompt_tokens - 1)
            if first < last:
                row_index.extend(range(offset + first - start, offset + last - start))
                targets.extend(seq.token_ids[first + 1 : last + 1])
                owners.append((seq, last - first))
        offset += num_new
    if not row_index:
        return
    device = hidden.device
    k = max(int(seq.params.prompt_logprobs or 0) for seq, _ in owners)
    entries: list[tuple[float, list[tuple[int, float]]]] = []
    for lo in range(0, len(row_index), PROMPT_ROWS_PER_SLICE):
        index = torch.tensor(row_index[lo : lo + PROMPT_ROWS_PER_SLICE], device=device)
        target = torch.tensor(targets[lo : lo + PROMPT_ROWS_PER_SLICE], device=device)
        logprobs = compute_logits(hidden.index_select(0, index)).float().log_softmax(dim=-1)
        entries.extend(_gather(logprobs, target, [k] * len(target)))
    position = 0
    for seq, count in owners:
        assert seq.prompt_logprobs is not None
        want = int(seq.params.prompt_logprobs or 0)
        for j in range(count):
            logprob, top = entries[position + j]
            token = seq.token_ids[len(seq.prompt_logprobs)]
            seq.prompt_logprobs.append(TokenLogprob(token, logprob, top[:want]))
        position += count


def attach(output: RequestOutput, seq: Sequence) -> RequestOutput:
    """Move the step's logprobs of `seq` onto its output (the prompt's once, on the first output)."""
    if seq.new_logprob is not None:
        output.logprobs, seq.new_logprob = [seq.new_logprob], None
    if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
        output.prompt_logprobs, seq.prompt_logprobs_sent = list(seq.prompt_logprobs), True
    return output


def to_wire(entry: TokenLogprob) -> dict[str, Any]:
    """A token's logprob as the KV hand-over's header carries it (JSON; floats round-trip exactly)."""
    return {"token_id": entry.token_id, "logprob": entry.logprob, "top": [list(pair) for pair in entry.top]}


def from_wire(value: Any) -> TokenLogprob | None:
    """The inverse of `to_wire`; None for a header without the field (a sender that does not ship it)."""
    if value is None:
        return None
    top = [(int(token), float(logprob)) for token, logprob in value.get("top", [])]
    return TokenLogprob(int(value["token_id"]), float(value["logprob"]), top)


def _gather(
    logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """(chosen token's logprob, top-k (id, logprob) pairs) per row, with one device->host copy for all rows
    (ids travel as float32, exact below 2**24)."""
    values = logprobs.gather(1, chosen.unsqueeze(1))  # [R, 1]
    k = min(max(ks, default=0), logprobs.shape[1])
    if k == 0:
        return [(v, []) for v in values.squeeze(1).tolist()]
    top_values, top_ids = logprobs.topk(k, dim=-1)
    packed = torch.cat([values, top_values, top_ids.float()], dim=1).tolist()  # [R, 1 + 2k]
    return [
        (row[0], [(int(i), v) for i, v in zip(row[1 + k : 1 + k + kr], row[1 : 1 + kr], strict=True)])
        for row, kr in zip(packed, ks, strict=True)
    ]
