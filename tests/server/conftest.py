"""Fixtures of the server tests: a real uvicorn server on a free port, in a thread of the test process."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from moefleet.engine.server.api import build_app
from moefleet.engine.server.async_engine import EngineClient, LocalEngineClient
from support.asgi import serve_asgi


class RunningServer:
    def __init__(self, base_url: str, client: EngineClient, app: Any):
        self.base_url = base_url
        self.client = client
        self.app = app

    def metric(self, name: str, labels: str = "") -> float:
        """Value of one sample in /metrics, e.g. metric("moefleet_requests_total", 'finish_reason="stop"')."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{wanted} not in /metrics:\n{text}")


@contextmanager
def serve_app(
    client: EngineClient, served_model_name: str = "tiny", routers: Any = ()
) -> Iterator[RunningServer]:
    """Run the real app under uvicorn on 127.0.0.1:<free port> until the block ends."""
    app = build_app(client, served_model_name, routers)
    with serve_asgi(app) as base_url:
        yield RunningServer(base_url, client, app)


@contextmanager
def serve_fake_engine(**engine_options: Any) -> Iterator[RunningServer]:
    """The app over `FakeEngine` (byte tokenizer, vocabulary 257); `.engine` is the fake engine."""
    from server.fake_engine import FakeEngine

    engine = FakeEngine(**engine_options)
    with serve_app(LocalEngineClient(engine, max_model_len=engine.max_model_len, vocab_size=257)) as running:
        running.engine = engine  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def fake_server() -> Iterator[RunningServer]:
    with serve_fake_engine() as running:
        yield running


@pytest.fixture(scope="module")
def shared_fake_server() -> Iterator[RunningServer]:
    """One server for a whole module, for tests that do not change engine behaviour or count metrics."""
    with serve_fake_engine() as running:
        yield running


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


async def stream_last_event(
    base_url: str, body: dict[str, Any], leave_after: int | None, timeout: float
) -> str | None:
    """POST a streaming completion; the last `data:` line, or None after leaving once `leave_after` arrived."""
    async with httpx.AsyncClient(timeout=timeout) as http:
        async with http.stream("POST", base_url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if leave_after is not None and len(events) >= leave_after:
                        return None  # leaving the block drops the connection mid-stream
            return events[-1]


def stop_process(process: subprocess.Popen, timeout: float = 60) -> int:
    """Ctrl-C a `moefleet serve` process and return its exit code; kill it and raise if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def complete_token_ids(
    base_url: str, model: str, prompt: list[int], new_tokens: int, timeout: float
) -> list[int]:
    """Greedy completion of a token-id prompt over HTTP: exactly `new_tokens` generated token ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "return_token_ids": True}
    response = httpx.post(base_url + "/v1/completions", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def wait_for_banner_url(process: subprocess.Popen, timeout: float = 120.0) -> str:
    """Read stdout until the examples banner names the address (the server listens by then)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"is serving '[^']+' at (http://\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError(
        f"server did not report its address; exit code {process.poll()}; output:\n{''.join(seen)}"
    )
