"""What a request asks for (SamplingParams) and what one engine step reports back (RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]

# Most top logprobs one token may carry (OpenAI's limit for chat is 20; completions allow 5).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A grammar every output token must follow: kind "json" (any JSON object; `spec` empty), "json_schema"
    (`spec` = the schema as JSON text), "regex" (`spec` = the pattern) or "choice" (`spec` = a JSON list of
    the allowed strings). Compiled and enforced by engine/structured_output.py."""

    kind: Literal["json", "json_schema", "regex", "choice"]
    spec: str = ""


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one token under the model's raw distribution (before temperature, top-k/top-p,
    penalties, bans or grammar masks), and the `top` most likely (token id, logprob) pairs, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 = greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    # -1 = no top-k filtering.
    top_k: int = -1
    max_tokens: int = 16
    # Per-request seed: the same seed gives the same tokens whatever else runs in the batch.
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # EOS and stop_token_ids cannot be sampled before this many output tokens.
    min_tokens: int = 0
    # Return the sampled tokens' logprobs with this many top alternatives (0: only the sampled token's).
    logprobs: int | None = None
    # Return the prompt tokens' logprobs (the first token has none) with this many top alternatives.
    prompt_logprobs: int | None = None
    # Constrain the output to a grammar (JSON, JSON schema, regex, choice).
    structured: StructuredOutput | None = None
    # Sequences with the same key and the same prompt share the KV blocks of the prompt (n > 1 choices).
    prefix_share_key: str | None = None
    # Decode special tokens too (tool-call markers of some templates are special tokens).
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1] (1 = disabled)")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k ({self.top_k}) must be -1 (disabled) or >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be in [0, max_tokens ({self.max_tokens})]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop ({self.stop!r}) must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids ({self.stop_token_ids!r}) must be non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} ({value}) must be in [0, {MAX_TOP_LOGPROBS}] or None (off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and the text they complete."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    # The stop string or stop token id that ended the request (finish_reason "stop"); None for EOS.
    stop_reason: str | int | None = None
    # One entry per new token when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None
    # With prompt_logprobs: the prompt's, on the first output (None for the first prompt token).
    prompt_logprobs: list[TokenLogprob | None] | None = None
