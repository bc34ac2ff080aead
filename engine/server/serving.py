"""The completion and chat-completion handlers: prompt -> token ids -> engine -> OpenAI JSON or SSE.

Decisions (context-length budget, sampling parameters) are pure functions so they are tested on their own.
Streaming follows OpenAI's chunk format exactly and ends with `data: [DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from moefleet.engine.sampling_params import SamplingParams
from moefleet.engine.server.async_engine import EngineClient
from moefleet.engine.server.errors import OpenAIError
from moefleet.engine.server.generation import ClientDisconnected, Generation
from moefleet.engine.server.metrics import ServerMetrics
from moefleet.engine.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    _SamplingRequest,
    now,
    random_id,
)
from starlette.requests import Request
from starlette.responses import Response

# OpenAI's default max_tokens for /v1/completions; chat defaults to the rest of the context window.
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass
class ServerState:
    client: EngineClient
    served_model_name: str
    metrics: ServerMetrics


def resolve_max_tokens(
    prompt_len: int, requested: int | None, default: int | None, max_model_len: int, max_tokens_param: str
) -> int:
    """How many tokens to generate, or a 400 saying why the request does not fit the context window."""
    if prompt_len == 0:
        raise OpenAIError("the prompt is empty after tokenization; send at least one token", param="prompt")
    if prompt_len >= max_model_len:
        raise OpenAIError(
            f"the prompt has {prompt_len} tokens but this server's context length (max_model_len) is "
            f"{max_model_len}, which leaves no room to generate; shorten the prompt to at most "
            f"{max_model_len - 1} tokens (or start the server with a larger --max-model-len)",
            param="prompt",
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if prompt_len + requested > max_model_len:
        raise OpenAIError(
            f"prompt ({prompt_len} tokens) + {max_tokens_param} ({requested}) = {prompt_len + requested} "
            f"tokens exceeds this server's context length of {max_model_len} tokens; set {max_tokens_param} "
            f"to at most {room} or shorten the prompt",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return requested


def to_sampling_params(body: _SamplingRequest, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_tokens=max_tokens,
            seed=body.seed,
            stop=list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
        )
    except ValueError as exc:  # SamplingParams names the field in its message
        raise OpenAIError(str(exc)) from exc


def check_model(state: ServerState, model: str) -> None:
    if model != state.served_model_name:
        raise OpenAIError(
            f"the model '{model}' does not exist; this server serves '{state.served_model_name}' (see GET /v1/models)",
            status_code=404,
            param="model",
            code="model_not_found",
        )


def check_token_ids(token_ids: list[int], vocab_size: int | None) -> None:
    if vocab_size is not None and token_ids and max(token_ids) >= vocab_size:
        raise OpenAIError(
            f"token id {max(token_ids)} in the prompt is out of range: the vocabulary has {vocab_size} tokens "
            f"(ids 0..{vocab_size - 1})",
            param="prompt",
        )


def _sse(payload: dict[str, Any] | str) -> str:
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n"


async def _start(
    state: ServerState, request: Request, request_id: str, prompt_ids: list[int], params: SamplingParams
) -> tuple[Generation, Any]:
    """Submit and wait for the first output, so admission errors still get a proper HTTP status."""
    generation = Generation(state.client, state.metrics, request, request_id, prompt_ids, params)
    try:
        return generation, await generation.next()
    except BaseException:
        await generation.close()
        raise


async def _run(generation: Generation, first: Any) -> tuple[str, list[int], Any]:
    """A non-streamed reply: the text and token ids up to the finished output (then the generation closes)."""
    try:
        text, token_ids, output = first.text_delta, list(first.new_token_ids), first
        while not output.finished:
            output = await generation.next()
            text += output.text_delta
            token_ids += output.new_token_ids
        return text, token_ids, output
    finally:
        await generation.close()


def _chunk(
    request_id: str, object_name: str, created: int, model: str, choice: dict[str, Any], include_usage: bool
) -> dict[str, Any]:
    """One streamed chunk (built as a plain dict: this runs once per token of every stream)."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last
    chunk["system_fingerprint"] = None
    return chunk


def _usage_chunk(request_id: str, created: int, model: str, object_name: str, last: Any) -> dict[str, Any]:
    # OpenAI's final chunk with stream_options.include_usage: no choices, only usage.
    usage = Usage.of(last.num_prompt_tokens, last.num_output_tokens).model_dump()
    return {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


async def _event_stream(
    generation: Generation,
    first: Any,
    render: Callable[[Any], list[dict[str, Any]]],
    usage_chunk: Callable[[Any], dict[str, Any]] | None,
) -> AsyncIterator[str]:
    """SSE body: rendered chunks per output, then the usage chunk, then [DONE]; errors become an SSE error."""
    output = first
    try:
        while True:
            for chunk in render(output):
                yield _sse(chunk)
            if output.finished:
                break
            output = await generation.next()
        if usage_chunk is not None:
            yield _sse(usage_chunk(output))
    except OpenAIError as exc:
        yield _sse(exc.body())
    except ClientDisconnected:
        return
    finally:
        await generation.close()
    yield _sse("[DONE]")


def _streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    tokenizer = state.client.tokenizer
    if isinstance(body.prompt, str):
        prompt_ids = list(tokenizer.encode(body.prompt))
    else:
        prompt_ids = list(body.prompt)
        check_token_ids(prompt_ids, getattr(state.client, "vocab_size", None))
    max_tokens = resolve_max_tokens(
        len(prompt_ids),
        body.max_tokens,
        DEFAULT_COMPLETION_MAX_TOKENS,
        state.client.max_model_len,
        "max_tokens",
    )
    params = to_sampling_params(body, max_tokens)
    request_id, created, model = random_id("cmpl"), now(), state.served_model_name
    try:
        generation, first = await _start(state, request, request_id, prompt_ids, params)
    except ClientDisconnected:
        return Response(status_code=499)

    if body.stream:
        include_usage = body.include_usage

        def render(output: Any) -> list[dict[str, Any]]:
            if not output.text_delta and not output.finished and not body.return_token_ids:
                return []
            choice: dict[str, Any] = {
                "index": 0,
                "text": output.text_delta,
                "logprobs": None,
                "finish_reason": output.finish_reason,
            }
            if body.return_token_ids:
                choice["token_ids"] = list(output.new_token_ids)
            return [_chunk(request_id, "text_completion", created, model, choice, include_usage)]

        usage = (
            partial(_usage_chunk, request_id, created, model, "text_completion") if include_usage else None
        )
        return _streaming_response(_event_stream(generation, first, render, usage))

    try:
        text, token_ids, last = await _run(generation, first)
    except ClientDisconnected:
        return Response(status_code=499)
    response = CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
        usage=Usage.of(last.num_prompt_tokens, last.num_output_tokens),
    )
    data = response.model_dump()
    if body.return_token_ids:  # extension: exact ids for clients (and tests) that compare tokens
        data["choices"][0]["token_ids"] = token_ids
        data["prompt_token_ids"] = prompt_ids
    return JSONResponse(data)


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response:
    check_model(state, body.model)
    tokenizer = state.client.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:  # no template, or the template rejects the messages (e.g. role order)
        raise OpenAIError(str(exc), param="messages") from exc
    except Exception as exc:  # any other failure inside the model's own jinja template
        raise OpenAIError(
            f"the model's chat template failed on these messages: {exc}", param="messages"
        ) from exc
    prompt_ids = list(tokenizer.encode(templated)) if isinstance(templated, str) else list(templated)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(
        len(prompt_ids), body.requested_max_tokens, None, state.client.max_model_len, max_param
    )
    params = to_sampling_params(body, max_tokens)
    request_id, created, model = random_id("chatcmpl"), now(), state.served_model_name
    try:
        generation, first = await _start(state, request, request_id, prompt_ids, params)
    except ClientDisconnected:
        return Response(status_code=499)

    if body.stream:
        include_usage = body.include_usage
        sent_role = False

        def chunk(delta: dict[str, Any], finish_reason: Any = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _chunk(request_id, "chat.completion.chunk", created, model, choice, include_usage)

        def render(output: Any) -> list[dict[str, Any]]:
            nonlocal sent_role
            chunks = []
            if not sent_role:  # OpenAI opens every chat stream with the role
                chunks.append(chunk({"role": "assistant", "content": ""}))
                sent_role = True
            if output.text_delta:
                chunks.append(chunk({"content": output.text_delta}))
            if output.finished:
                chunks.append(chunk({}, output.finish_reason))
            return chunks

        usage = (
            partial(_usage_chunk, request_id, created, model, "chat.completion.chunk")
            if include_usage
            else None
        )
        return _streaming_response(_event_stream(generation, first, render, usage))

    try:
        text, _, last = await _run(generation, first)
    except ClientDisconnected:
        return Response(status_code=499)
    response = ChatCompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[ChatChoice(message=ChatResponseMessage(content=text), finish_reason=last.finish_reason)],
        usage=Usage.of(last.num_prompt_tokens, last.num_output_tokens),
    )
    return JSONResponse(response.model_dump())
