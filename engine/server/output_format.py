"""Pure translations between OpenAI request/response fields and engine values: logprobs objects (completions'
legacy shape and chat's), and the grammar (`StructuredOutput`) a request's response_format, guided_* fields
or forced tool_choice asks for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from moefleet.engine.sampling_params import StructuredOutput, TokenLogprob
from moefleet.engine.server.protocol import ChatCompletionRequest, NamedToolChoice, _SamplingRequest


class TokenTexts:
    """Token id -> its text as logprobs show it (special tokens included; a token ending inside a UTF-8
    character shows U+FFFD, as in vLLM), cached per id."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        try:
            return str(self._tokenizer.decode([token_id], skip_special_tokens=False))
        except TypeError:  # a tokenizer without the keyword
            return str(self._tokenizer.decode([token_id]))


def completion_logprobs(
    texts: TokenTexts, entries: Sequence[TokenLogprob], text_offset: int
) -> dict[str, Any]:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts; the sampled token is
    included, as vLLM does) and text_offset (character offsets, starting at `text_offset`)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    for entry in entries:
        token = texts.text(entry.token_id)
        tokens.append(token)
        token_logprobs.append(entry.logprob)
        top = {texts.text(t): v for t, v in entry.top}
        top.setdefault(token, entry.logprob)
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def echo_logprobs(
    texts: TokenTexts,
    prompt_ids: list[int],
    prompt_entries: Sequence[TokenLogprob | None],
    output_entries: Sequence[TokenLogprob],
) -> dict[str, Any]:
    """Completions logprobs of an echoed prompt followed by the output (offsets from 0); the first prompt
    token has no logprob (null entries, as OpenAI)."""
    first = texts.text(prompt_ids[0])
    rest = completion_logprobs(texts, [e for e in prompt_entries[1:] if e is not None], len(first))
    tail = completion_logprobs(texts, output_entries, len(first) + sum(len(t) for t in rest["tokens"]))
    return {
        "tokens": [first, *rest["tokens"], *tail["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"], *tail["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"], *tail["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"], *tail["text_offset"]],
    }


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob], top_k: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = texts.text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top[:top_k]]}
            for e in entries
        ],
        "refusal": None,
    }


def structured_output(body: _SamplingRequest) -> StructuredOutput | None:
    """The grammar asked by response_format / guided_json / guided_regex / guided_choice (at most one is
    set; the protocol checks it), or by a forced tool_choice on chat."""
    if isinstance(body, ChatCompletionRequest):
        forced = forced_tool_schema(body)
        if forced is not None:
            return StructuredOutput("json_schema", json.dumps(forced))
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        return StructuredOutput("json")
    if fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None
        return StructuredOutput("json_schema", json.dumps(fmt.json_schema.json_schema))
    if body.guided_json is not None:
        schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        return StructuredOutput("json_schema", schema)
    if body.guided_regex is not None:
        return StructuredOutput("regex", body.guided_regex)
    if body.guided_choice is not None:
        return StructuredOutput("choice", json.dumps(body.guided_choice))
    return None


def forced_tool_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """tool_choice "required" or a named function: the JSON the model must write (as vLLM does it).

    named -> the function's arguments object; required -> a list of {"name", "parameters"} objects, one of
    the tools each (a single one when parallel_tool_calls is false)."""
    tools = body.tools or []
    if isinstance(body.tool_choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == body.tool_choice.name)
        return tool.function.parameters or {"type": "object"}
    if body.tool_choice == "required":
        choices = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": choices}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return schema
    return None
