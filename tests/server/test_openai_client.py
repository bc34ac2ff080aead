"""The official `openai` client against the server (fake engine: exact expected text is known)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import APIRouter, Request
from moefleet.engine.server.async_engine import LocalEngineClient
from moefleet.engine.server.errors import OpenAIError
from server.conftest import serve_app
from server.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def test_completion(client, fake_server):
    result = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == "tiny"
    assert abs(result.created - time.time()) < 60
    assert result.choices[0].text == "defgh" and result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        3,
        5,
        8,
    )
    by_ids = client.completions.create(model="tiny", prompt=[97, 98, 99], max_tokens=5)
    assert by_ids.choices[0].text == "defgh"
    listed = client.completions.create(model="tiny", prompt=["abc"], max_tokens=2)
    assert listed.choices[0].text == "de"


def test_completion_stop_string(client):
    result = client.completions.create(model="tiny", prompt="abc", max_tokens=10, stop=["fg"])
    assert result.choices[0].finish_reason == "stop"
    assert "fg" not in result.choices[0].text


def test_completion_stream(client):
    chunks = list(
        client.completions.create(
            model="tiny", prompt="abc", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == "defg"
    assert [c.choices[0].finish_reason for c in text_chunks] == [None, None, None, "length"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 4
    assert all(c.usage is None for c in text_chunks)


def test_chat(client):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
    ]
    result = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # FakeEngine's template ends with "<assistant>": next bytes after ">" are "?@A".
    assert choice.message.content == "?@A"
    assert result.usage.prompt_tokens == len("<system>be brief\n<user>hi\n<assistant>")


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "?@A"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].delta.content is None
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_stream_format_ends_with_done(fake_server):
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-4", prompt="a")
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="a", n=0)
    assert bad.value.body["param"] == "n"


def test_models_and_health(client, fake_server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(fake_server.base_url + "/health", timeout=10).json() == {"status": "ok"}


def test_metrics_count_tokens_and_requests(client, fake_server):
    client.completions.create(model="tiny", prompt="abcd", max_tokens=3)
    client.completions.create(model="tiny", prompt="ab", max_tokens=10, stop="e")
    assert fake_server.metric("moefleet_requests_total", 'finish_reason="length"') == 1
    assert fake_server.metric("moefleet_requests_total", 'finish_reason="stop"') == 1
    assert fake_server.metric("moefleet_prompt_tokens_total") == 6
    assert fake_server.metric("moefleet_generation_tokens_total") == 3 + 3
    assert fake_server.metric("moefleet_time_to_first_token_seconds_count") == 2
    assert fake_server.metric("moefleet_inter_token_latency_seconds_count") == 2 + 2
    assert fake_server.metric("moefleet_e2e_request_latency_seconds_count") == 2
    assert fake_server.metric("moefleet_kv_cache_blocks_capacity") == 64


def test_engine_thread_owns_engine_and_sleeps_when_idle():
    engine = FakeEngine()
    with serve_app(LocalEngineClient(engine, max_model_len=256, vocab_size=257)) as running:
        httpx.post(
            running.base_url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3}
        )
        steps = engine.steps
        time.sleep(0.3)
        assert engine.steps == steps == 3  # no steps (no busy loop) while idle
    assert len(engine.thread_ids) == 1  # one thread touched the engine


def test_docs_list_every_exported_metric(fake_server):
    """docs/serving.md's metrics table names every moefleet_ metric family /metrics exports."""
    docs = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    text = httpx.get(fake_server.base_url + "/metrics", timeout=10).text
    exported = {
        name for name in re.findall(r"^# TYPE (moefleet_\w+) ", text, re.M) if not name.endswith("_created")
    }
    # 11 + preemptions + 2 PD gauges + 7 per-rank gauges + 2 TBO series
    assert len(exported) == 23, exported
    undocumented = [name for name in exported if f"`{name}" not in docs]
    assert not undocumented, f"exported but not documented in docs/serving.md: {undocumented}"


def test_extra_routers_reach_server_state():
    router = APIRouter()

    @router.post("/admin/rebalance")
    async def rebalance(request: Request) -> dict:
        state = request.app.state.moefleet  # ServerState: client, served_model_name, metrics
        raise OpenAIError(f"{state.served_model_name} runs on one rank", code="not_applicable")

    client = LocalEngineClient(FakeEngine(), max_model_len=256, vocab_size=257)
    with serve_app(client, "tiny", routers=[router]) as server:
        response = httpx.post(server.base_url + "/admin/rebalance", timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "not_applicable"
    assert response.json()["error"]["message"] == "tiny runs on one rank"
