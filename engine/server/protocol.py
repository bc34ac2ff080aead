"""Pydantic models of the OpenAI-compatible request and response bodies.

Requests forbid unknown fields (a silently dropped setting is worse than a clear 400); OpenAI fields that
moefleet does not implement are declared so that their non-default values are rejected with a message that
names them. Field validators raise `ValueError` whose text becomes the 400 message (see errors.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    # Extension (not in OpenAI's API): sample among the k most likely tokens; -1 or 0 = off.
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | None = None  # a string is accepted and becomes a one-item list
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (vLLM-style): keep generating after EOS (benchmarks); token ids that end the output;
    # EOS/stop ids are not sampled before min_tokens.
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    user: str | None = None  # accepted for client compatibility; not used
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1 (got {value})")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"temperature must be >= 0 (got {value}); use 0 for greedy decoding")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {value})")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer (got {value})")
        return -1 if value == 0 else value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported (got {value}); send {value} separate requests instead")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else value if value is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings are supported (got {len(stops)})")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported yet; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported; remove it")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed together with stream=true")
        return self


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is a string, a list of token ids, or a list holding one string."""

    prompt: str | list[int]
    echo: bool = False
    # Extension: also return the generated token ids (choices[0].token_ids) and the prompt's ids.
    return_token_ids: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        # Checked by hand so the message says what a prompt may be instead of listing union members.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("prompt must be a string, a list of token ids, or a list holding one string")
        if not value:
            raise ValueError("prompt must not be empty")
        if all(isinstance(item, str) for item in value):
            if len(value) != 1:
                raise ValueError(
                    f"only one prompt per request is supported (got a list of {len(value)}); send one request per prompt"
                )
            return value[0]
        if any(isinstance(item, list) for item in value):
            raise ValueError(
                "only one prompt per request is supported (got a list of token-id lists); send one request per prompt"
            )
        if any(isinstance(item, bool) or not isinstance(item, int) or item < 0 for item in value):
            raise ValueError("a token-id prompt must be a list of non-negative integers")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo=true is not supported; leave it out")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> None:
        if value is not None:
            raise ValueError("logprobs are not supported yet; leave the field out")
        return None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> None:
        if value not in (None, 1):
            raise ValueError("best_of > 1 is not supported; leave it out")
        return None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix is not supported; leave it out")
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} parts")
        for part in value if isinstance(value, list) else []:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"only text content parts are supported (got {kind!r}); send the text only")
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must hold at least one message")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be at least 1 (got {value})")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported yet; leave the field out")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> None:
        if value is not None:
            raise ValueError("top_logprobs is not supported yet; leave the field out")
        return None

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tool calling is not supported; leave tools out")
        return None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> None:
        if value and value.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length", "abort"] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "moefleet"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
