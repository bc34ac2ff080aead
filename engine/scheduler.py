"""Continuous batching with chunked prefill and preemption by recompute (no torch).

One step, under a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`):
  1. Running sequences, oldest first: each decoding sequence computes its last sampled token; the one
     sequence still prefilling (always the newest, see below) computes its next prompt chunk.
     A sequence that cannot get a KV block preempts the newest running sequence (blocks freed, back to the
     head of the queue, recomputed later) until it fits, or until it was itself the newest.
  2. If nothing was preempted, waiting sequences are admitted in FIFO order with the budget left; the last
     one admitted may get only a chunk of its prompt, the rest next step.
A budget can only run out on the last sequence of the step, so at most one running sequence is ever mid-
prompt and it is the newest; decodes therefore always come first and are never starved by a long prompt.
A sequence samples when its step computes up to its last token (prompt fully cached).

Prefix sharing (n > 1): a waiting sequence with a `prefix_share_key` whose running sibling (same key, same
prompt) has cached the prompt's full blocks starts with those blocks (reference counted, block_manager.py)
and computes only the rest of its prompt. While the sibling is still prefilling, the sequence waits for it.

Scheduling only decides and reserves blocks; `advance` records the computed tokens after the model ran.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class KVCacheFullError(ValueError):
    """Decode side: a valid request whose prompt's KV has no room in the cache now (not the request's fault:
    the server answers 503 `kv_cache_full` and the gateway tries another decode group)."""


@dataclass(slots=True)
class ScheduledSequence:
    """Compute tokens [start, start + num_new_tokens) of `seq` this step."""

    seq: Sequence
    start: int
    num_new_tokens: int
    # True when this step reaches the sequence's last token, so its logits give the next token.
    samples: bool


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_prefill(self) -> bool:
        """Any sequence computes more than one token (a prompt or prompt chunk)."""
        return any(s.num_new_tokens > 1 for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling(self) -> list[ScheduledSequence]:
        return [s for s in self.scheduled if s.samples]


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        # Disaggregation: sequences parked with their blocks while their KV moves (never scheduled).
        self.waiting_for_kv: dict[str, Sequence] = {}  # decode side
        self.sending_kv: dict[str, Sequence] = {}  # prefill side
        self.num_preemptions_total = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; reject requests that could never complete."""
        num_prompt, max_tokens = seq.num_prompt_tokens, seq.params.max_tokens
        if num_prompt == 0:
            raise ValueError("prompt_token_ids is empty: send at least one prompt token")
        if num_prompt > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt} tokens) is longer than max_model_len ({self.max_model_len}): "
                "shorten the prompt or raise max_model_len"
            )
        if num_prompt + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                f"({self.max_model_len}): lower max_tokens to at most {self.max_model_len - num_prompt}"
            )
        # The last sampled token never needs a KV slot.
        blocks = self.block_manager.blocks_for(num_prompt + max_tokens - 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks but the "
                f"pool has {self.block_manager.num_blocks}: lower max_tokens or raise num_kv_blocks"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._fit(seq, min(seq.num_uncached_tokens, budget))
            while num_new == 0:  # no free block: preempt the newest running sequence
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                num_new = self._fit(seq, min(seq.num_uncached_tokens, budget))
            if seq.status is not SequenceStatus.RUNNING:
                break
            out.scheduled.append(self._reserve(seq, num_new))
            budget -= num_new
            i += 1
        # Admitting right after a preemption would only evict again; let the running set shrink first.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._share_prefix(seq):
                break  # its sibling is still prefilling the common prompt
            # Keep one block per running sequence free so admissions do not force next step's decodes to preempt.
            num_new = self._fit(seq, min(seq.num_uncached_tokens, budget), reserve_blocks=len(self.running))
            if num_new == 0:
                self.block_manager.free(seq)  # a waiting sequence holds no blocks
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(self._reserve(seq, num_new))
            budget -= num_new
        return out

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the model computed (and cached K/V of) the scheduled tokens."""
        for s in out.scheduled:
            s.seq.num_cached_tokens = s.start + s.num_new_tokens

    def finish(self, seq: Sequence) -> None:
        """Retire a running sequence whose finish_reason is set; its blocks return to the pool."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    # ---- disaggregation (engine/disaggregation/roles.py) ---------------------------------------------------

    def reserve_for_kv(self, seq: Sequence) -> None:
        """Decode side: check `seq` like `add`, reserve blocks for its prompt's KV and park it until it lands."""
        self.add(seq)
        self.waiting.pop()
        if not self.block_manager.can_allocate(seq, seq.num_prompt_tokens):
            raise KVCacheFullError(
                f"the decode KV cache has no room for this prompt ({seq.num_prompt_tokens} tokens) now: retry later"
            )
        self.block_manager.allocate(seq, seq.num_prompt_tokens)
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.waiting_for_kv[seq.request_id] = seq

    def resume_with_kv(self, seq: Sequence) -> None:
        """Decode side: the prompt's KV landed in the reserved blocks; decode from the next step on."""
        del self.waiting_for_kv[seq.request_id]
        seq.num_cached_tokens = seq.num_prompt_tokens
        seq.status = SequenceStatus.RUNNING
        # Keep a sequence that is mid-prompt last (see the module docstring).
        mid_prompt = (
            bool(self.running) and self.running[-1].num_cached_tokens < self.running[-1].num_prompt_tokens
        )
        self.running.insert(len(self.running) - 1 if mid_prompt else len(self.running), seq)

    def park_sending(self, seq: Sequence) -> None:
        """Prefill side: stop scheduling `seq` (prompt computed), keep its blocks while they are sent."""
        self.running.remove(seq)
        seq.status = SequenceStatus.SENDING_KV
        self.sending_kv[seq.request_id] = seq

    def finish_sent(self, seq: Sequence) -> None:
        """Prefill side: the transfer ended (acknowledged or failed); free the blocks."""
        del self.sending_kv[seq.request_id]
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its blocks now. Returns it, or None if unknown."""
        parked = self.waiting_for_kv.pop(request_id, None) or self.sending_kv.pop(request_id, None)
        if parked is not None:
            self.block_manager.free(parked)
            parked.status = SequenceStatus.FINISHED
            parked.finish_reason = "abort"
            return parked
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)  # type: ignore[arg-type]
                    self.block_manager.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "abort"
                    return seq
        return None

    def _share_prefix(self, seq: Sequence) -> bool:
        """Give `seq` the full prompt blocks of a running sibling; False when it should wait for the sibling
        to finish prefilling them. Sequences without a key (or asking for prompt logprobs) never wait."""
        key = seq.params.prefix_share_key
        if key is None or seq.block_table or seq.prompt_logprobs is not None:
            return True
        bs = self.block_manager.block_size
        num_blocks = (seq.num_prompt_tokens - 1) // bs  # full blocks before the last prompt token
        if num_blocks == 0:
            return True
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        for other in self.running:
            if (
                other.params.prefix_share_key == key
                and other.num_prompt_tokens == seq.num_prompt_tokens
                and other.token_ids[: other.num_prompt_tokens] == prompt
            ):
                if other.num_cached_tokens < num_blocks * bs:
                    return False
                self.block_manager.share(seq, other.block_table[:num_blocks])
                seq.num_cached_tokens = num_blocks * bs
                return True
        return True

    def _fit(self, seq: Sequence, num_tokens: int, reserve_blocks: int = 0) -> int:
        """How many of the next `num_tokens` tokens of `seq` fit in its blocks plus the free ones."""
        bm = self.block_manager
        free = bm.num_free_blocks - reserve_blocks
        if free < 0:
            return 0
        capacity = (len(seq.block_table) + free) * bm.block_size - seq.num_cached_tokens
        return max(0, min(num_tokens, capacity))

    def _reserve(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_cached_tokens
        self.block_manager.allocate(seq, start + num_new)
        return ScheduledSequence(seq, start, num_new, samples=start + num_new == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1
