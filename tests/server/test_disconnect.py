"""Clients that go away: their requests are aborted in the engine, and the server stays healthy."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from moefleet.engine.server.async_engine import LocalEngineClient
from server.conftest import serve_app
from server.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(90)


async def _stream(base_url: str, index: int, disconnect_after: int | None) -> str | None:
    # Leavers ask for far more tokens than they wait for, so only an abort (not the end) can stop them.
    max_tokens = 40 if disconnect_after is None else 1000
    body = {"model": "tiny", "prompt": "a" * (1 + index % 7), "max_tokens": max_tokens, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", base_url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if disconnect_after is not None and len(events) >= disconnect_after:
                        return None  # leaving the block closes the connection mid-stream
            return events[-1]


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


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
