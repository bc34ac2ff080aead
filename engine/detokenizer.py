"""Incremental detokenization and stop conditions, one `IncrementalDetokenizer` per request.

Text deltas are clean UTF-8: a token that ends inside a multi-byte character (byte-level BPE) decodes to
U+FFFD, so its text is held back until a later token completes the character. Decoding always starts a few
tokens back (`prefix_offset`), because many tokenizers decode a token differently at the start of a text
(leading-space rules). Text that could still turn into a stop string is held back too, so a stop string is
never emitted, even when it spans several tokens.
"""

from __future__ import annotations

from typing import Protocol

from .sampling_params import FinishReason, SamplingParams

# Tokens of context decoded before the new ones (enough for leading-space and merge rules).
PREFIX_WINDOW = 6


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


def stop_token_hit(
    params: SamplingParams, token_id: int, num_previous_outputs: int, eos_token_ids: list[int]
) -> tuple[bool, int | None]:
    """Does sampled `token_id` end the request? Returns (stopped, stop_reason): None for EOS, else the id.

    As in vLLM, min_tokens counts the tokens generated *before* a stop: EOS cannot stop the request until
    min_tokens other tokens exist (the model runner also masks those ids until then)."""
    if num_previous_outputs < params.min_tokens:
        return False, None
    if not params.ignore_eos and token_id in eos_token_ids:
        return True, None
    if token_id in params.stop_token_ids:
        return True, token_id
    return False, None


class IncrementalDetokenizer:
    """Turns one request's sampled tokens into text deltas and decides when it finishes."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
    ):
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.token_ids = list(prompt_token_ids[-PREFIX_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.num_output_tokens = 0
        self.output_text = ""
        self._emitted = 0
        # Holding back this many characters guarantees no emitted text becomes part of a stop string.
        self._stop_hold = max((len(s) for s in params.stop), default=1) - 1

    def update(self, token_id: int) -> tuple[str, FinishReason | None, str | int | None]:
        """Add one sampled token. Returns (text delta, finish_reason or None, stop_reason)."""
        previous = self.num_output_tokens
        self.num_output_tokens += 1
        stopped, stop_reason = stop_token_hit(self.params, token_id, previous, self.eos_token_ids)
        if stopped:
            # The stop/EOS token's own text is not part of the answer.
            return self._take_delta(finished=True), "stop", stop_reason
        self.token_ids.append(token_id)
        finished = self.num_output_tokens >= self.params.max_tokens
        new_chars = self._decode_new(flush=finished)
        if self.params.stop and previous >= self.params.min_tokens:
            matched = self._find_stop_string(new_chars)
            if matched is not None:
                return self._take_delta(finished=True), "stop", matched
        if finished:
            return self._take_delta(finished=True), "length", None
        return self._take_delta(finished=False), None, None

    def _decode_new(self, flush: bool) -> int:
        """Append newly completed text to output_text; returns how many characters were added."""
        skip = self.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset], skip)
        full_text = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not flush):
            return 0  # nothing new, or an incomplete character: wait for the next token
        new_text = full_text[len(prefix_text) :]
        self.output_text += new_text
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return len(new_text)

    def _find_stop_string(self, num_new_chars: int) -> str | None:
        """Earliest stop string that ends in the new text; truncates output_text before it."""
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            start = max(0, len(self.output_text) - num_new_chars - len(stop) + 1)
            index = self.output_text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.output_text = self.output_text[: best[0]]
        return best[1]

    def _take_delta(self, finished: bool) -> str:
        end = (
            len(self.output_text) if finished else max(self._emitted, len(self.output_text) - self._stop_hold)
        )
        delta = self.output_text[self._emitted : end]
        self._emitted = end
        return delta
