"""Token embedding and LM head. The head returns float32 logits; it can share the embedding's weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moefleet.engine.layers.linear import set_weight_loader
from torch import nn


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [B, D] -> logits [B, V] in float32 (sampling wants full precision)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        if tied_to is not None:
            # Shared storage: loading `model.embed_tokens.weight` fills both.
            self.weight = tied_to.weight
        else:
            self.weight = set_weight_loader(
                nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()
