"""Every bad input gets its HTTP status and OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.timeout(60)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (route, raw body, status, param the error must name; None = no field to name)
CASES = [
    (COMPLETIONS, b"{", 400, None),
    (COMPLETIONS, b"[1, 2]", 400, None),
    (COMPLETIONS, {"model": "tiny"}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "a"}, 400, "model"),
    (COMPLETIONS, {"model": "tiny", "prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": ["a", 1]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, -2]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [[1, 2], []]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, 100000]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "top_k": -3}, 400, "top_k"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "n": 0}, 400, "n"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "n": 1000}, 400, "n"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "logprobs": 50}, 400, "logprobs"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "n": 3, "best_of": 2}, 400, None),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "best_of": 3, "stream": True}, 400, None),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "guided_regex": "a+", "guided_choice": ["a"]}, 400, None),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "guided_choice": []}, 400, "guided_choice"),
    (
        COMPLETIONS,
        {"model": "tiny", "prompt": "a", "response_format": {"type": "yaml"}},
        400,
        "response_format.type",
    ),
    (
        COMPLETIONS,
        {"model": "tiny", "prompt": "a", "response_format": {"type": "json_schema"}},
        400,
        "response_format",
    ),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "stop": ""}, 400, "stop"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "stop": [1]}, 400, "stop"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "stream_options": {"include_usage": True}}, 400, None),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    (COMPLETIONS, {"model": "tiny", "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x" * 300}, 400, "prompt"),
    (COMPLETIONS, {"model": "other-model", "prompt": "a"}, 404, "model"),
    (COMPLETIONS, b"", 400, None),
    (COMPLETIONS, b"null", 400, None),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages.0"),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages.0.content",
    ),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": 7}]}, 400, "messages.0.content"),
    (CHAT, {"model": "tiny", "messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"model": "tiny", "messages": USER, "max_tokens": 10_000}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"model": "tiny", "messages": USER, "top_logprobs": 2}, 400, None),
    (CHAT, {"model": "tiny", "messages": USER, "n": 0}, 400, "n"),
    (CHAT, {"model": "tiny", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    (CHAT, {"model": "tiny", "messages": USER, "tool_choice": "required"}, 400, None),
    (
        CHAT,
        {
            "model": "tiny",
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        None,
    ),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": None}]}, 400, "messages.0"),
    (CHAT, {"model": "nope", "messages": USER}, 404, "model"),
]


def _check_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    return error


@pytest.mark.parametrize(("route", "body", "status", "param"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_request_gets_openai_error(shared_fake_server, route, body, status, param):
    fake_server = shared_fake_server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        fake_server.base_url + route,
        content=content,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    error = _check_error_shape(response, status)
    assert error["param"] == param, error
    # The server keeps serving after the bad input.
    ok = httpx.post(
        fake_server.base_url + COMPLETIONS,
        json={"model": "tiny", "prompt": "ab", "max_tokens": 2},
        timeout=10,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "cd"


def test_context_length_message_says_the_numbers(shared_fake_server):
    fake_server = shared_fake_server
    response = httpx.post(
        fake_server.base_url + COMPLETIONS,
        json={"model": "tiny", "prompt": [1] * 200, "max_tokens": 100},
        timeout=10,
    )
    message = _check_error_shape(response, 400)["message"]
    for number in ("200", "100", "300", "256", "56"):
        assert number in message, message
    assert _check_error_shape(response, 400)["code"] == "context_length_exceeded"


def test_unknown_route_and_wrong_method(shared_fake_server):
    fake_server = shared_fake_server
    _check_error_shape(httpx.get(fake_server.base_url + "/v1/nothing-here", timeout=10), 404)
    _check_error_shape(httpx.get(fake_server.base_url + COMPLETIONS, timeout=10), 405)
    _check_error_shape(httpx.delete(fake_server.base_url + "/v1/models", timeout=10), 405)


def test_engine_failure_answers_500_and_server_recovers(fake_server):
    fake_server.engine.fail_next_steps = 1
    response = httpx.post(
        fake_server.base_url + COMPLETIONS,
        json={"model": "tiny", "prompt": "ab", "max_tokens": 4},
        timeout=10,
    )
    assert "simulated device failure" in _check_error_shape(response, 500)["message"]
    assert fake_server.metric("moefleet_requests_total", 'finish_reason="error"') == 1
    ok = httpx.post(
        fake_server.base_url + COMPLETIONS,
        json={"model": "tiny", "prompt": "ab", "max_tokens": 4},
        timeout=10,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "cdef"
    assert httpx.get(fake_server.base_url + "/health", timeout=10).status_code == 200


def test_engine_failure_mid_stream_ends_with_error_event(fake_server):
    fake_server.engine.step_delay = 0.02
    with httpx.stream(
        "POST",
        fake_server.base_url + COMPLETIONS,
        json={"model": "tiny", "prompt": "ab", "max_tokens": 50, "stream": True},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if len(events) == 2:
                    fake_server.engine.fail_next_steps = 1
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "simulated device failure" in error["message"]


def test_engine_that_cannot_recover_is_reported_dead():
    from server.conftest import serve_fake_engine

    with serve_fake_engine() as server:
        engine = server.engine

        def broken_abort(request_id: str) -> None:
            raise RuntimeError("device lost")

        engine.fail_next_steps = 1
        engine.abort_request = broken_abort  # the engine cannot even clean up after the failed step
        first = httpx.post(server.base_url + COMPLETIONS, json={"model": "tiny", "prompt": "a"}, timeout=10)
        _check_error_shape(first, 500)
        health = httpx.get(server.base_url + "/health", timeout=10)
        assert "device lost" in _check_error_shape(health, 503)["message"]
        later = httpx.post(server.base_url + COMPLETIONS, json={"model": "tiny", "prompt": "a"}, timeout=10)
        assert _check_error_shape(later, 503)["type"] == "service_unavailable_error"


def test_chat_template_rejection_is_a_400(shared_fake_server):
    tokenizer = shared_fake_server.client.tokenizer
    original = tokenizer.apply_chat_template

    def strict_template(messages, add_generation_prompt=True):
        if messages[0]["role"] != "system":
            raise ValueError("conversations must start with a system message")
        return original(messages, add_generation_prompt)

    tokenizer.apply_chat_template = strict_template
    try:
        response = httpx.post(
            shared_fake_server.base_url + CHAT, json={"model": "tiny", "messages": USER}, timeout=10
        )
    finally:
        tokenizer.apply_chat_template = original
    error = _check_error_shape(response, 400)
    assert error["param"] == "messages" and "start with a system message" in error["message"]
