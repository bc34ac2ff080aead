"""Pydantic models of the OpenAI-compatible request and response bodies.

Requests forbid unknown fields (a silently dropped setting is worse than a clear 400); OpenAI fields that
moefleet does not implement are declared so that their non-default values are rejected with a message that
names them. Field validators raise `ValueError` whose text becomes the 400 message (see errors.py).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from moefleet.engine.sampling_params import MAX_TOP_LOGPROBS
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


MAX_N = 64


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    # "schema" shadows a BaseModel attribute in pydantic, hence the alias.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema: {name, schema, strict}")
        return self


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
    # Structured outputs: OpenAI's response_format, and vLLM-style extensions (at most one of them).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("guided_choice")
    @classmethod
    def _guided_choice(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not c for c in value)):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_structure(self) -> _SamplingRequest:
        given = [
            name
            for name in ("guided_json", "guided_regex", "guided_choice")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"use at most one of {', '.join(given)} (each constrains the whole output)")
        return self

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        # 0 only scores an echoed prompt (completions with echo=true); the handlers check that.
        if value is not None and value < 0:
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
        if not 1 <= value <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}] (got {value})")
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
    """POST /v1/completions. `prompt` is a string, a list of token ids, or a batch: a list of strings or of
    token-id lists (choice `index` = prompt index * n + choice)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    # Extension: also return the generated token ids (choices[i].token_ids) and the prompt's ids.
    return_token_ids: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        # Checked by hand so the message says what a prompt may be instead of listing union members.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(
                "prompt must be a string, a list of token ids, or a list of strings or of token-id lists"
            )
        if not value:
            raise ValueError("prompt must not be empty")
        if all(isinstance(item, str) for item in value):
            return value
        if all(isinstance(item, list) for item in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request (got {len(value)})")
            for item in value:
                _check_token_ids(item)
            return value
        _check_token_ids(value)
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {value})")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix is not supported; leave it out")
        return None

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_N:
                raise ValueError(f"best_of must be in [n ({self.n}), {MAX_N}] (got {self.best_of})")
            if self.stream and self.best_of > self.n:
                raise ValueError("best_of > n cannot be streamed; set stream=false or best_of=n")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch of prompts (one for a single prompt)."""
        prompt: Any = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], str | list):
            return list(prompt)
        return [list(prompt)]


MAX_PROMPTS = 256


def _check_token_ids(value: list[Any]) -> None:
    if not value:
        raise ValueError("a token-id prompt must not be empty")
    if any(isinstance(item, bool) or not isinstance(item, int) or item < 0 for item in value):
        raise ValueError("a token-id prompt must be a list of non-negative integers")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # An assistant turn that called tools, and the tool turn answering one call.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, str | list):
            raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} parts")
        for part in value if isinstance(value, list) else []:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"only text content parts are supported (got {kind!r}); send the text only")
        return value

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        for name in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        if self.tool_calls:
            message["tool_calls"] = [_template_tool_call(call) for call in self.tool_calls]
        return message


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's shape (function.arguments a JSON string, which DeepSeek's template concatenates and Qwen3's
    prints as is), plus top-level `name` and parsed `arguments` for templates that read those."""
    function = dict(call.get("function") or {})
    arguments: Any = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {**call, "function": function, "name": function.get("name"), "arguments": arguments}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: dict[str, str]

    @property
    def name(self) -> str:
        return self.function.get("name", "")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Extension (vLLM/SGLang): keyword arguments for the chat template (e.g. {"enable_thinking": false}).
    chat_template_kwargs: dict[str, Any] | None = None

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

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {value})")
        return value

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.name not in names:
                raise ValueError(
                    f"tool_choice names the function {self.tool_choice.name!r}, which is not in tools "
                    f"({', '.join(names) or 'none given'})"
                )
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and (self.response_format is not None and self.response_format.type != "text"):
            raise ValueError("a forced tool_choice cannot be combined with a response_format")
        return self

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


FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason
    # The stop string or token id that ended the choice (vLLM's field).
    stop_reason: str | int | None = None


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
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason
    stop_reason: str | int | None = None


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


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
