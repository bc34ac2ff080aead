"""The completion and chat-completion handlers: prompt -> token ids -> engine -> OpenAI JSON or SSE.

Decisions (context-length budget, sampling parameters) are pure functions so they are tested on their own.
Streaming follows OpenAI's chunk format exactly and ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from moefleet.engine.sampling_params import SamplingParams, StructuredOutput, TokenLogprob
from moefleet.engine.server.async_engine import EngineClient
from moefleet.engine.server.errors import OpenAIError
from moefleet.engine.server.generation import ClientDisconnected, GenerationGroup
from moefleet.engine.server.metrics import ServerMetrics
from moefleet.engine.server.output_format import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    structured_output,
)
from moefleet.engine.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    NamedToolChoice,
    Usage,
    _SamplingRequest,
    now,
    random_id,
)
from moefleet.engine.server.tool_parsers import (
    StreamingToolParser,
    ToolCall,
    ToolParser,
    parser_for_template,
    split_reasoning,
    template_marks_reasoning,
)
from moefleet.engine.structured_output import GrammarError, compiler_for
from starlette.requests import Request
from starlette.responses import Response

# OpenAI's default max_tokens for /v1/completions; chat defaults to the rest of the context window.
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass
class ServerState:
    client: EngineClient
    served_model_name: str
    metrics: ServerMetrics
    grammar_compiler: Any = None  # structured outputs: built on the first request that needs it


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


def _usage_chunk(request_id: str, created: int, model: str, object_name: str, usage: Usage) -> dict[str, Any]:
    # OpenAI's final chunk with stream_options.include_usage: no choices, only usage.
    return {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.model_dump(),
    }


def _streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- requests with several engine members (n choices x prompts) ------------------------------------------


@dataclass
class Member:
    """One engine request of an HTTP request: choice `index` of prompt `prompt_index`, and what it produced."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0

    def add(self, output: Any) -> None:
        self.text += output.text_delta
        self.token_ids += output.new_token_ids
        if output.logprobs:
            self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.num_output_tokens = output.num_output_tokens
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


def choice_params(params: SamplingParams, choice: int, share_key: str | None) -> SamplingParams:
    """The parameters of choice `choice`: with a seed s, choice i samples with seed s + i (so it equals a
    single request with seed s + i); choices of one prompt share its KV blocks."""
    seed = None if params.seed is None else params.seed + choice
    return replace(params, seed=seed, prefix_share_key=share_key)


def _usage(members: list[Member]) -> Usage:
    prompts = {m.prompt_index: len(m.prompt_ids) for m in members}
    return Usage.of(sum(prompts.values()), sum(m.num_output_tokens for m in members))


async def _start_group(
    state: ServerState, request: Request, request_id: str, members: list[Member]
) -> tuple[GenerationGroup, tuple[int, Any]]:
    """Submit every member and wait for the first output, so admission errors still get an HTTP status."""
    ids = [request_id] if len(members) == 1 else [f"{request_id}-{i}" for i in range(len(members))]
    group = GenerationGroup(
        state.client,
        state.metrics,
        request,
        [(rid, m.prompt_ids, m.params) for rid, m in zip(ids, members, strict=True)],
    )
    try:
        return group, await group.next()
    except BaseException:
        await group.close()
        raise


async def _collect(group: GenerationGroup, first: tuple[int, Any], members: list[Member]) -> None:
    """A non-streamed reply: every member's outputs up to its finished one (then the group closes)."""
    try:
        index, output = first
        members[index].add(output)
        while not group.done:
            index, output = await group.next()
            members[index].add(output)
    finally:
        await group.close()


async def _group_stream(
    group: GenerationGroup,
    first: tuple[int, Any],
    render: Callable[[int, Any], list[dict[str, Any]]],
    usage_chunk: Callable[[], dict[str, Any]] | None,
) -> AsyncIterator[str]:
    """SSE body: rendered chunks per output, then the usage chunk, then [DONE]; errors become an SSE error."""
    item = first
    try:
        while True:
            for chunk in render(*item):
                yield _sse(chunk)
            if group.done:
                break
            item = await group.next()
        if usage_chunk is not None:
            yield _sse(usage_chunk())
    except OpenAIError as exc:
        yield _sse(exc.body())
    except ClientDisconnected:
        return
    finally:
        await group.close()
    yield _sse("[DONE]")


async def check_grammar(state: ServerState, structured: StructuredOutput | None, param: str) -> None:
    """Compile the request's grammar once here, so a bad schema or regex is a 400 naming the field."""
    if structured is None:
        return
    tokenizer = state.client.tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    vocab_size = getattr(state.client, "vocab_size", None)
    if backend is None or vocab_size is None:
        raise OpenAIError(
            "structured outputs need the model's fast tokenizer (tokenizer.json); this server has none",
            param=param,
        )
    eos = list(getattr(tokenizer, "eos_token_ids", []) or [])
    try:
        if state.grammar_compiler is None:  # the first structured request builds the tokenizer's tables
            state.grammar_compiler = await asyncio.to_thread(compiler_for, backend, int(vocab_size), eos)
        await asyncio.to_thread(state.grammar_compiler.compile, structured)
    except GrammarError as exc:
        raise OpenAIError(str(exc), param=param) from exc


def _structured_param(body: _SamplingRequest) -> str:
    for name in ("guided_json", "guided_regex", "guided_choice"):
        if getattr(body, name) is not None:
            return name
    if isinstance(body, ChatCompletionRequest) and body.tool_choice not in (None, "auto", "none"):
        return "tool_choice"
    return "response_format"


# ---- /v1/completions ---------------------------------------------------------------------------------------


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    tokenizer = state.client.tokenizer
    prompts = body.prompts()
    prompt_ids: list[list[int]] = []
    prompt_texts: list[str] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            prompt_ids.append(list(tokenizer.encode(prompt)))
            prompt_texts.append(prompt)
        else:
            check_token_ids(list(prompt), getattr(state.client, "vocab_size", None))
            prompt_ids.append(list(prompt))
            prompt_texts.append(tokenizer.decode(list(prompt)) if body.echo else "")
    # max_tokens 0 with echo scores the prompt only: one token is generated and dropped.
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise OpenAIError(
            "max_tokens must be at least 1 (0 is only allowed with echo=true, to score the prompt)",
            param="max_tokens",
        )
    structured = structured_output(body)
    await check_grammar(state, structured, _structured_param(body))
    n, best_of = body.n, body.best_of or body.n
    ranked = best_of > n
    echo_logprobs_asked = body.echo and body.logprobs is not None
    members: list[Member] = []
    request_id, created, model = random_id("cmpl"), now(), state.served_model_name
    for p, ids in enumerate(prompt_ids):
        max_tokens = resolve_max_tokens(
            len(ids),
            1 if score_only else body.max_tokens,
            DEFAULT_COMPLETION_MAX_TOKENS,
            state.client.max_model_len,
            "max_tokens",
        )
        base = to_sampling_params(body, max_tokens)
        base.structured = structured
        if body.logprobs is not None or ranked:
            base.logprobs = body.logprobs or 0
        if echo_logprobs_asked:
            base.prompt_logprobs = body.logprobs
        share = f"{request_id}-{p}" if best_of > 1 else None
        for j in range(best_of):
            members.append(Member(p * best_of + j, p, ids, choice_params(base, j, share)))
    try:
        group, first = await _start_group(state, request, request_id, members)
    except ClientDisconnected:
        return Response(status_code=499)
    texts = TokenTexts(tokenizer)

    def choice_index(member: Member) -> int:
        return member.prompt_index * n + member.index % best_of

    if body.stream:  # best_of == n here (the protocol refuses streaming a ranked request)
        include_usage = body.include_usage
        offsets = [0] * len(members)
        started = [False] * len(members)

        def render(i: int, output: Any) -> list[dict[str, Any]]:
            member = members[i]
            if score_only:
                output = replace(output, new_token_ids=[], text_delta="", logprobs=None, num_output_tokens=0)
            member.add(output)
            text, logprobs = output.text_delta, None
            if body.logprobs is not None and output.logprobs:
                logprobs = completion_logprobs(texts, output.logprobs, offsets[i])
            if body.echo and not started[i]:
                text = prompt_texts[member.prompt_index] + text
                if echo_logprobs_asked and output.prompt_logprobs is not None:
                    logprobs = echo_logprobs(
                        texts, member.prompt_ids, output.prompt_logprobs, output.logprobs or []
                    )
            started[i] = True
            if not text and not output.finished and not body.return_token_ids and logprobs is None:
                return []
            offsets[i] += len(text)
            choice: dict[str, Any] = {
                "index": choice_index(member),
                "text": text,
                "logprobs": logprobs,
                "finish_reason": output.finish_reason,
            }
            if output.finished:
                choice["stop_reason"] = output.stop_reason
            if body.return_token_ids:
                choice["token_ids"] = list(output.new_token_ids)
            return [_chunk(request_id, "text_completion", created, model, choice, include_usage)]

        usage = (
            (lambda: _usage_chunk(request_id, created, model, "text_completion", _usage(members)))
            if include_usage
            else None
        )
        return _streaming_response(_group_stream(group, first, render, usage))

    try:
        await _collect(group, first, members)
    except ClientDisconnected:
        return Response(status_code=499)
    if score_only:
        for member in members:
            member.text, member.token_ids, member.logprobs, member.num_output_tokens = "", [], [], 0
    chosen = members
    if ranked:  # best_of: the n choices of each prompt with the highest cumulative logprob
        chosen = []
        for p in range(len(prompt_ids)):
            candidates = [m for m in members if m.prompt_index == p]
            candidates.sort(key=lambda m: m.cumulative_logprob, reverse=True)
            for j, m in enumerate(candidates[:n]):
                m.index = p * best_of + j
                chosen.append(m)
    choices = []
    data_token_ids = []
    for member in chosen:
        prefix = prompt_texts[member.prompt_index] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            if body.echo:
                logprobs = echo_logprobs(
                    texts, member.prompt_ids, member.prompt_logprobs or [], member.logprobs
                )
            else:
                logprobs = completion_logprobs(texts, member.logprobs, 0)
        choices.append(
            CompletionChoice(
                index=choice_index(member),
                text=prefix + member.text,
                logprobs=logprobs,
                finish_reason=member.finish_reason,  # type: ignore[arg-type]
                stop_reason=member.stop_reason,
            )
        )
        data_token_ids.append(member.token_ids)
    response = CompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=_usage(members)
    )
    data = response.model_dump()
    if body.return_token_ids:  # extension: exact ids for clients (and tests) that compare tokens
        for choice_data, token_ids in zip(data["choices"], data_token_ids, strict=True):
            choice_data["token_ids"] = token_ids
        data["prompt_token_ids"] = prompt_ids[0] if len(prompt_ids) == 1 else prompt_ids
    return JSONResponse(data)


# ---- /v1/chat/completions ----------------------------------------------------------------------------------


@dataclass
class ChatMode:
    """How a chat request's output is read: tool-call parser, reasoning split, forced tool JSON."""

    parser: ToolParser | None
    reasoning: bool
    starts_inside_reasoning: bool
    forced: str | None  # "named" or "required": the output is the JSON the grammar forced
    forced_name: str | None = None

    @property
    def plain(self) -> bool:
        return self.parser is None and not self.reasoning and self.forced is None


def chat_mode(body: ChatCompletionRequest, chat_template: str | None, prompt_text: str) -> ChatMode:
    tools_on = bool(body.tools) and body.tool_choice != "none"
    forced, forced_name = None, None
    if isinstance(body.tool_choice, NamedToolChoice):
        forced, forced_name = "named", body.tool_choice.name
    elif body.tool_choice == "required":
        forced = "required"
    parser = parser_for_template(chat_template) if tools_on and forced is None else None
    reasoning = forced is None and template_marks_reasoning(chat_template)
    inside = reasoning and prompt_text.rstrip().endswith("<think>")
    return ChatMode(parser, reasoning, inside, forced, forced_name)


def forced_tool_calls(mode: ChatMode, text: str) -> list[ToolCall]:
    """The tool calls a forced tool_choice's JSON output stands for (none if it was cut off)."""
    if mode.forced == "named":
        assert mode.forced_name is not None
        return [ToolCall(mode.forced_name, text)]
    try:
        items = json.loads(text)
    except ValueError:
        return []
    return [
        ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


def _chat_message(mode: ChatMode, text: str) -> tuple[ChatResponseMessage, bool]:
    """(message, has tool calls) of a whole output."""
    if mode.forced is not None:
        calls = forced_tool_calls(mode, text)
        return ChatResponseMessage(
            content=None if calls else text, tool_calls=[c.to_openai() for c in calls] or None
        ), bool(calls)
    reasoning = None
    if mode.reasoning:
        reasoning, text = split_reasoning(text, mode.starts_inside_reasoning)
    parsed: list[ToolCall] = []
    if mode.parser is not None:
        text, parsed = mode.parser.parse(text)
    content = text if text or not parsed else None
    return (
        ChatResponseMessage(
            content=content, reasoning_content=reasoning, tool_calls=[c.to_openai() for c in parsed] or None
        ),
        bool(parsed),
    )


def _render_template(
    tokenizer: Any, messages: list[dict[str, Any]], kwargs: dict[str, Any]
) -> tuple[list[int], str]:
    """(prompt ids, prompt text) of the chat template applied to `messages`."""
    render = getattr(tokenizer, "render_chat", None)
    try:
        if render is not None:
            text = render(messages, add_generation_prompt=True, **kwargs)
            return list(tokenizer.encode(text, add_special_tokens=False)), text
        templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except ValueError as exc:  # no template, or the template rejects the messages (e.g. role order)
        raise OpenAIError(str(exc), param="messages") from exc
    except Exception as exc:  # any other failure inside the model's own jinja template
        raise OpenAIError(
            f"the model's chat template failed on these messages: {exc}", param="messages"
        ) from exc
    if isinstance(templated, str):
        return list(tokenizer.encode(templated)), templated
    return list(templated), tokenizer.decode(list(templated))


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response:
    check_model(state, body.model)
    if body.requested_max_tokens == 0:
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise OpenAIError(f"{param} must be at least 1 (got 0)", param=param)
    tokenizer = state.client.tokenizer
    messages = [m.for_template() for m in body.messages]
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:
        template_kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
    prompt_ids, prompt_text = _render_template(tokenizer, messages, template_kwargs)
    mode = chat_mode(body, getattr(tokenizer, "chat_template", None), prompt_text)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(
        len(prompt_ids), body.requested_max_tokens, None, state.client.max_model_len, max_param
    )
    structured = structured_output(body)
    await check_grammar(state, structured, _structured_param(body))
    base = to_sampling_params(body, max_tokens)
    base.structured = structured
    if body.logprobs:
        base.logprobs = body.top_logprobs or 0
    if mode.parser is not None:
        base.skip_special_tokens = False  # some templates' tool-call markers are special tokens
    share = None
    request_id, created, model = random_id("chatcmpl"), now(), state.served_model_name
    if body.n > 1:
        share = request_id
    members = [Member(j, 0, prompt_ids, choice_params(base, j, share)) for j in range(body.n)]
    try:
        group, first = await _start_group(state, request, request_id, members)
    except ClientDisconnected:
        return Response(status_code=499)
    texts = TokenTexts(tokenizer)
    top_k = body.top_logprobs or 0

    if body.stream:
        include_usage = body.include_usage
        sent_role = [False] * len(members)
        parsers = [
            StreamingToolParser(mode.parser, mode.reasoning, mode.starts_inside_reasoning) for _ in members
        ]
        named_started = [False] * len(members)

        def chunk(
            index: int, delta: dict[str, Any], finish_reason: Any = None, logprobs: Any = None
        ) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return _chunk(request_id, "chat.completion.chunk", created, model, choice, include_usage)

        def tool_call_deltas(index: int, calls: list[ToolCall], first_number: int) -> list[dict[str, Any]]:
            out = []
            for k, call in enumerate(calls, start=first_number):
                head = {
                    "index": k,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                out.append(chunk(index, {"tool_calls": [head]}))
                out.append(
                    chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
                )
            return out

        def render(i: int, output: Any) -> list[dict[str, Any]]:
            member = members[i]
            member.add(output)
            chunks = []
            if not sent_role[i]:  # OpenAI opens every chat stream with the role
                chunks.append(chunk(i, {"role": "assistant", "content": ""}))
                sent_role[i] = True
            logprobs = (
                chat_logprobs(texts, output.logprobs, top_k) if body.logprobs and output.logprobs else None
            )
            delta_text = output.text_delta
            finish_reason = output.finish_reason
            if mode.forced == "named":
                if not named_started[i]:
                    named_started[i] = True
                    assert mode.forced_name is not None
                    head = ToolCall(mode.forced_name, "")
                    chunks.append(
                        chunk(
                            i,
                            {
                                "tool_calls": [
                                    {
                                        "index": 0,
                                        "id": head.id,
                                        "type": "function",
                                        "function": {"name": head.name, "arguments": ""},
                                    }
                                ]
                            },
                        )
                    )
                if delta_text or logprobs:
                    chunks.append(
                        chunk(
                            i,
                            {"tool_calls": [{"index": 0, "function": {"arguments": delta_text}}]},
                            logprobs=logprobs,
                        )
                    )
            elif mode.forced == "required":
                if logprobs:
                    chunks.append(chunk(i, {}, logprobs=logprobs))
                if output.finished:
                    calls = forced_tool_calls(mode, member.text)
                    chunks += tool_call_deltas(i, calls, 0)
                    if calls:
                        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
                    elif member.text:
                        chunks.append(chunk(i, {"content": member.text}))
            elif mode.plain:
                if delta_text or logprobs:
                    chunks.append(chunk(i, {"content": delta_text}, logprobs=logprobs))
            else:
                parser = parsers[i]
                sent = len(parser.calls)
                d = parser.feed(delta_text)
                if output.finished:
                    tail = parser.finish()
                    d.content += tail.content
                    d.reasoning += tail.reasoning
                    d.tool_calls += tail.tool_calls
                if d.reasoning:
                    chunks.append(chunk(i, {"reasoning_content": d.reasoning}))
                if d.content or logprobs:
                    chunks.append(chunk(i, {"content": d.content}, logprobs=logprobs))
                chunks += tool_call_deltas(i, d.tool_calls, sent)
                if output.finished and parser.calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            if output.finished:
                chunks.append(chunk(i, {}, finish_reason))
            return chunks

        usage = (
            (lambda: _usage_chunk(request_id, created, model, "chat.completion.chunk", _usage(members)))
            if include_usage
            else None
        )
        return _streaming_response(_group_stream(group, first, render, usage))

    try:
        await _collect(group, first, members)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for member in members:
        message, has_calls = _chat_message(mode, member.text)
        finish_reason = member.finish_reason
        if has_calls and finish_reason == "stop" and mode.forced != "named":
            finish_reason = "tool_calls"
        choices.append(
            ChatChoice(
                index=member.index,
                message=message,
                logprobs=chat_logprobs(texts, member.logprobs, top_k) if body.logprobs else None,
                finish_reason=finish_reason,  # type: ignore[arg-type]
                stop_reason=member.stop_reason,
            )
        )
    response = ChatCompletionResponse(
        id=request_id, created=created, model=model, choices=choices, usage=_usage(members)
    )
    return JSONResponse(response.model_dump(exclude_none=False))
