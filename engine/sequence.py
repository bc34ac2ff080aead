"""Sequence: one request's tokens, how many of them have K/V in the cache, and where (no torch)."""

from __future__ import annotations

import itertools
from enum import Enum, auto

from .sampling_params import FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(Enum):
    WAITING = auto()  # queued, holds no KV blocks (new, or preempted and to be recomputed)
    RUNNING = auto()  # admitted: holds KV blocks, prefilling in chunks or decoding
    FINISHED = auto()
    # Prefill/decode disaggregation (engine/disaggregation/roles.py):
    WAITING_FOR_KV = auto()  # decode side: holds reserved blocks, its prompt's KV is being sent by prefill
    SENDING_KV = auto()  # prefill side: prompt computed, first token sampled, blocks being sent to decode


class Sequence:
    """Prompt + generated tokens. Tokens [0, num_cached_tokens) have K/V in the blocks of `block_table`."""

    _ids = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.params = params
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        # Logprobs (written by the model runner, engine/logprobs.py): the prompt's, filled chunk by chunk
        # (the first prompt token has none), and the last sampled token's, taken by the engine each step.
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.new_logprob: TokenLogprob | None = None
        self.prompt_logprobs_sent = False

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, cached={self.num_cached_tokens}, "
            f"{self.status.name})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens still to compute before the next sample: the prompt (or its rest), or the last sampled token."""
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
