"""Clients that go away: their requests are aborted in the engine, and the server stays healthy."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from moefleet.engine.server.async_engine import LocalEngineClient
from server.conftest import serve_app, stream_last_event, wait_for
from server.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(90)


async def _stream(base_url: str, index: int, disconnect_after: int | None) -> str | None:
    # Leavers ask for far more tokens than they wait for, so only an abort (not the end) can stop them.
    max_tokens = 40 if disconnect_after is None else 1000
    body = {"model": "tiny", "prompt": "a" * (1 + index % 7), "max_tokens": max_tokens, "stream": True}
    return await stream_last_event(base_url, body, disconnect_after, timeout=30)


def _wait_for(condition) -> None:
    wait_for(condition, timeout=10.0, interval=0.02)


def test_streaming_disconnects_abort_requests():
    engine = FakeEngine(max_model_len=2048, step_delay=0.005)
    with serve_app(LocalEngineClient(engine, max_model_len=2048, vocab_size=257)) as server:

        async def scenario() -> list[str | None]:
            tasks = [_stream(server.base_url, i, 3 if i % 3 == 0 else None) for i in range(30)]
            return await asyncio.gather(*tasks)

        results = asyncio.run(scenario())
        assert sum(r == "data: [DONE]" for r in results) == 20
        _wait_for(lambda: server.metric("moefleet_requests_total", 'finish_reason="abort"') == 10)
        _wait_for(lambda: len(engine.aborted) == 10)  # every leaver was aborted in the engine, not finished
        assert server.metric("moefleet_requests_total", 'finish_reason="length"') == 20
        _wait_for(lambda: server.metric("moefleet_kv_cache_blocks_used") == 0)
        assert not engine.requests


def test_non_streaming_disconnect_aborts():
    engine = FakeEngine(max_model_len=256, step_delay=0.02)
    with serve_app(LocalEngineClient(engine, max_model_len=256, vocab_size=257)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.base_url + "/v1/completions",
                json={"model": "tiny", "prompt": "a", "max_tokens": 200},
                timeout=0.3,
            )
        _wait_for(lambda: len(engine.aborted) == 1)
        _wait_for(lambda: server.metric("moefleet_num_requests_running") == 0)
        assert server.metric("moefleet_requests_total", 'finish_reason="abort"') == 1


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_every_choice_of_an_n_request(stream):
    """n = 3 choices are three engine requests: a client leaving aborts all of them."""
    engine = FakeEngine(max_model_len=2048, step_delay=0.02)
    with serve_app(LocalEngineClient(engine, max_model_len=2048, vocab_size=257)) as server:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 1000, "n": 3, "stream": stream}
        if stream:
            assert asyncio.run(stream_last_event(server.base_url, body, 4, timeout=30)) is None
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.base_url + "/v1/completions", json=body, timeout=0.3)
        _wait_for(lambda: len(engine.aborted) == 3)
        assert len({request_id.rsplit("-", 1)[0] for request_id in engine.aborted}) == 1
        _wait_for(lambda: server.metric("moefleet_num_requests_running") == 0)
        assert not engine.requests
