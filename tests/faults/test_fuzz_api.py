"""Property-based fuzzing of /v1/completions and /v1/chat/completions on a real `moefleet serve` (tiny model) and
on a real `moefleet gateway` in front of it (every test runs against both).

Bodies come from the request schema the server's OpenAPI document is generated from (pydantic's JSON schema
of its request models, turned into hypothesis strategies by schema_strategy.py), then are broken on purpose: a field replaced by any
JSON value, any JSON document as the body, raw bytes. Properties: never a 5xx, the server never dies, every
error is OpenAI's error shape, streams are well-formed SSE. Oversize and deeply nested bodies are refused
early (413 / 400) by the request guard. Seeded (derandomized): the same examples on every run.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from faults.conftest import MODEL, SHARED_MAX_REQUEST_BYTES, record
from faults.schema_strategy import ANY_JSON, from_schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moefleet.engine.server.protocol import ChatCompletionRequest, CompletionRequest
from moefleet.engine.server.request_guard import DEFAULT_MAX_JSON_DEPTH
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SERVED = tiny_model_dir(MODEL).name
ENDPOINTS = {"completions": CompletionRequest, "chat/completions": ChatCompletionRequest}
MAX_NEW = 4  # generated tokens per valid example: keeps each example in milliseconds on CPU
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

json_values = ANY_JSON

# Figures per target, summed over its tests; `seen` is the current target's.
SEEN: dict[str, dict[str, Any]] = {
    name: {"requests": 0, "statuses": {}, "5xx": 0, "target": name} for name in ("server", "gateway")
}
seen: dict[str, Any] = SEEN["server"]


@pytest.fixture(params=["server", "gateway"])
def target(request: pytest.FixtureRequest) -> str:
    """The base URL under test: the engine server itself, or the gateway relaying to it."""
    global seen
    seen = SEEN[request.param]
    process = request.getfixturevalue("shared_server" if request.param == "server" else "shared_gateway")
    return str(process.base_url)


# What most clients send; the other optional fields are kept in a minority of examples (each has its own rules).
COMMON = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "stream",
    "stream_options",
    "temperature",
    "seed",
    "stop",
}


def _bounded(body: dict[str, Any], served: bool, max_new: int, common_only: bool) -> dict[str, Any]:
    """Schema-valid bodies, made cheap: a small generation budget, and (mostly) the served model's name."""
    body = {k: v for k, v in body.items() if k in COMMON} if common_only else dict(body)
    if served:
        body["model"] = SERVED
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > max_new:
            body[key] = max_new
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_new  # chat's default is the rest of the context window
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > max_new:
        body["min_tokens"] = max_new
    return body


def _schema_bodies(model: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        _bounded,
        from_schema(model.model_json_schema()),
        st.booleans() | st.just(True),  # the served model's name in about 3 of 4 examples
        st.integers(1, MAX_NEW),
        st.booleans(),
    )


def _check_reply(response: httpx.Response, body_text: str) -> None:
    status = response.status_code
    seen["requests"] += 1
    seen["statuses"][status] = seen["statuses"].get(status, 0) + 1
    assert status < 500, (status, body_text)
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in body_text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", body_text[-500:]
        for event in events[:-1]:
            parsed = json.loads(event)
            if "error" in parsed:  # an error after the stream started: OpenAI's shape, then [DONE]
                assert set(parsed["error"]) == {"message", "type", "param", "code"}
        return
    reply = response.json()
    assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply


def _post(base_url: str, path: str, content: bytes, content_type: str = "application/json") -> None:
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{base_url}/v1/{path}", content=content, headers={"content-type": content_type}
        ) as response:
            text = response.read().decode(errors="replace")
            _check_reply(response, text)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzz_schema_bodies_and_mutations(target, path):
    url = target
    bodies = _schema_bodies(ENDPOINTS[path])

    @FUZZ
    @given(body=bodies, field=st.text(max_size=12) | st.sampled_from(["model", "prompt", "messages",
           "max_tokens", "temperature", "stop", "stream", "n", "logit_bias", "stream_options"]),
           value=json_values, mutate=st.booleans())  # fmt: skip
    def fuzz(body: dict[str, Any], field: str, value: Any, mutate: bool) -> None:
        if mutate:
            body = {**body, field: value}
        _post(url, path, json.dumps(body).encode())

    fuzz()
    assert httpx.get(url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzz_any_json_and_raw_bytes(target, path):
    url = target

    @FUZZ
    @given(
        payload=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
        content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
    )
    def fuzz(payload: bytes, content_type: str) -> None:
        _post(url, path, payload, content_type)

    fuzz()
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_oversize_and_deeply_nested_bodies_are_refused_early(target):
    url = target + "/v1/completions"
    limit = SHARED_MAX_REQUEST_BYTES
    big = json.dumps({"model": SERVED, "prompt": "x" * limit}).encode()
    refused = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert refused.status_code == 413 and _error(refused)["code"] == "request_too_large"
    assert str(limit) in _error(refused)["message"]

    def chunks():  # no Content-Length: the guard counts the bytes as they arrive
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert chunked.status_code == 413

    nested = ("[" * 10_000 + "]" * 10_000).encode()
    deep = httpx.post(url, content=nested, headers={"content-type": "application/json"}, timeout=30)
    assert deep.status_code == 400 and _error(deep)["code"] == "json_too_deep"
    inner: Any = 1
    for _ in range(DEFAULT_MAX_JSON_DEPTH - 1):
        inner = [inner]
    at_limit = {"model": SERVED, "prompt": [5, 6], "max_tokens": 1, "x": inner}  # exactly the limit deep
    shallow_enough = httpx.post(url, json=at_limit, timeout=30)
    assert shallow_enough.status_code == 400, shallow_enough.text  # reaches the handler: unknown field 'x'
    assert _error(shallow_enough)["param"] == "x"
    just_fits = json.dumps({"model": SERVED, "prompt": [5, 6], "max_tokens": 1, "suffix": None}).encode()
    just_fits += b" " * (limit - len(just_fits))
    assert len(just_fits) == limit
    fits = httpx.post(url, content=just_fits, headers={"content-type": "application/json"}, timeout=30)
    assert fits.status_code == 200, fits.text
    assert httpx.get(target + "/health", timeout=10).status_code == 200
    record(f"api_fuzzing_{seen['target']}", requests=seen["requests"], server_errors_5xx=seen["5xx"],
           statuses=json.dumps(dict(sorted(seen["statuses"].items()))), crashes=0)  # fmt: skip
