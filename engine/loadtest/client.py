"""The side effects of a load test: send the planned requests to an OpenAI-compatible endpoint and time them.

One asyncio task per planned request waits for its send time, then for a concurrency slot, then streams
(`stream_options.include_usage` for exact token counts). A client planned to leave early closes its
connection after that many content chunks (a real disconnect: the connection is not reused). A request that
has not ended within `request_timeout_s` is counted as hung and abandoned.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from moefleet.engine.loadtest.plan import PlannedRequest
from moefleet.engine.loadtest.report import RequestResult

WORDS = ("the", "a", "model", "serves", "many", "experts", "on", "each", "node", "and", "every", "token")


@dataclass(frozen=True, slots=True)
class Target:
    base_url: str  # http://host:port (a trailing /v1 is accepted)
    model: str
    endpoint: str = "completions"  # or "chat"
    stream: bool = True
    ignore_eos: bool = False  # vLLM/moefleet extension: exact output lengths
    api_key: str | None = None
    request_timeout_s: float = 60.0

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/").removesuffix("/v1")
        return f"{base}/v1/chat/completions" if self.endpoint == "chat" else f"{base}/v1/completions"


def prompt_text(length: int, index: int) -> str:
    """`length` words, different per request (so prefix caches do not flatter the numbers)."""
    return " ".join(WORDS[(index * 7 + i) % len(WORDS)] for i in range(length))


def request_body(target: Target, planned: PlannedRequest) -> dict[str, Any]:
    text = prompt_text(planned.prompt_len, planned.index)
    body: dict[str, Any] = {"model": target.model, "max_tokens": planned.max_tokens, "stream": target.stream}
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if target.stream:
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


def _content(event: dict[str, Any]) -> tuple[bool, str | None]:
    """(whether this chunk carries content, its finish_reason)."""
    choices = event.get("choices") or []
    if not choices:
        return False, None
    choice = choices[0]
    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
    return bool(text), choice.get("finish_reason")


async def _stream(
    response: httpx.Response, planned: PlannedRequest, result: RequestResult, sent: float
) -> None:
    last = sent
    chunks = 0
    usage_tokens: int | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            message = (
                event["error"].get("message", "") if isinstance(event["error"], dict) else event["error"]
            )
            result.error = f"stream error: {message}"
            return
        if event.get("usage"):
            usage_tokens = int(event["usage"].get("completion_tokens", 0))
        has_content, finish_reason = _content(event)
        now = time.monotonic()
        if has_content:
            if result.ttft_s is None:
                result.ttft_s = now - sent
            else:
                result.itl_s.append(now - last)
            last = now
            chunks += 1
        if finish_reason is not None:
            result.finish_reason = finish_reason
        if (
            planned.leave_after_chunks is not None
            and chunks >= planned.leave_after_chunks
            and not finish_reason
        ):
            result.left_early = True  # leaving the `stream` block drops the connection mid-stream
            break
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks


async def _one(
    http: httpx.AsyncClient, target: Target, planned: PlannedRequest, slots: asyncio.Semaphore, start: float
) -> RequestResult:
    await asyncio.sleep(max(0.0, start + planned.send_at_s - time.monotonic()))
    result = RequestResult(planned.index)
    async with slots:
        sent = time.monotonic()
        try:
            async with asyncio.timeout(target.request_timeout_s):
                async with http.stream("POST", target.url, json=request_body(target, planned)) as response:
                    result.status = response.status_code
                    if response.status_code != 200:
                        raw = await response.aread()
                        try:
                            message = json.loads(raw)["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            message = raw[:200].decode(errors="replace")
                        result.error = f"http {response.status_code}: {message}"
                    elif target.stream:
                        await _stream(response, planned, result, sent)
                    else:
                        reply = json.loads(await response.aread())
                        result.finish_reason = reply["choices"][0].get("finish_reason")
                        result.output_tokens = int((reply.get("usage") or {}).get("completion_tokens", 0))
                        result.ttft_s = time.monotonic() - sent
        except TimeoutError:
            result.hung = True
            result.error = "hung: no end within the request timeout"
        except httpx.HTTPError as exc:
            result.error = f"transport {type(exc).__name__}: {exc}"
        result.latency_s = time.monotonic() - sent
    return result


async def run_load(
    target: Target, plan: list[PlannedRequest], concurrency: int
) -> tuple[list[RequestResult], float]:
    """Send every planned request; (results in plan order, wall seconds)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # Connecting may take a while when a thousand clients arrive at once at a busy server: an error after 30 s.
    timeout = httpx.Timeout(target.request_timeout_s, connect=min(30.0, target.request_timeout_s))
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as http:
        start = time.monotonic()
        results = await asyncio.gather(*(_one(http, target, planned, slots, start) for planned in plan))
        wall = time.monotonic() - start
    return list(results), wall


def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first model GET /v1/models lists (the default of --model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    response = httpx.get(url, headers=headers, timeout=10)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])
