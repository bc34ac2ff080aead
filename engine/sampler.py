"""Token sampling from float32 logits: greedy, or temperature -> top-k -> top-p -> draw.

Draws use the exponential-race form of categorical sampling (argmax of p / E with E ~ Exp(1)), which
lets every row take its noise from its own torch.Generator: a seeded request gets the same tokens
whatever else shares its batch. Shape legend: B sampling sequences, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling settings for a [B, V] logits tensor."""

    temperatures: list[float]
    top_ks: list[int]  # -1 = off
    top_ps: list[float]  # 1.0 = off
    generators: list[torch.Generator | None]  # None: greedy row


def apply_top_k(logits: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) all but the k largest logits of each row; k <= 0 keeps the row whole. Ties at the
    k-th value are all kept."""
    vocab = logits.shape[-1]
    k = torch.where(top_ks <= 0, vocab, top_ks.clamp(max=vocab))
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(-1, (k - 1).unsqueeze(-1))  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped if the tokens strictly before it already reach top_p.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_ps.unsqueeze(-1)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
    """Pick one token per row of `logits` [B, V]."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(batch.temperatures) if t > 0.0]
    if rows:
        device = logits.device
        index = torch.tensor(rows, device=device)
        sub = logits[index] / torch.tensor([batch.temperatures[i] for i in rows], device=device).unsqueeze(-1)
        # Decided on the host lists, so no device sync per step.
        top_ks = [batch.top_ks[i] for i in rows]
        if any(k > 0 for k in top_ks):
            sub = apply_top_k(sub, torch.tensor(top_ks, device=device))
        top_ps = [batch.top_ps[i] for i in rows]
        if any(p < 1.0 for p in top_ps):
            sub = apply_top_p(sub, torch.tensor(top_ps, device=device))
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs)
        # One draw per distinct generator: rows sharing one (unseeded requests) take a single kernel.
        by_generator: dict[int, list[int]] = {}
        for j, i in enumerate(rows):
            by_generator.setdefault(id(batch.generators[i]), []).append(j)
        for members in by_generator.values():
            generator = batch.generators[rows[members[0]]]
            if len(members) == 1:
                noise[members[0]].exponential_(generator=generator)
            else:
                index_rows = torch.tensor(members, device=device)
                noise[index_rows] = torch.empty_like(noise[index_rows]).exponential_(generator=generator)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a zero draw would turn p / E into nan
        tokens[index] = (probs / noise).argmax(dim=-1)
    return tokens.tolist()
