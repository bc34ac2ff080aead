"""GET /health/progress over a real uvicorn server: a hung engine step is reported, an idle or stepping
engine is healthy (the engine pods' liveness probe, moefleet.operator.pod_defaults)."""

from __future__ import annotations

import threading

import httpx
import pytest
from moefleet.engine.server.api import build_app
from moefleet.engine.server.async_engine import LocalEngineClient
from moefleet.engine.server.progress import ProgressClock, make_router, timeout_from_environment
from server.conftest import wait_for
from server.fake_engine import FakeEngine
from support.asgi import serve_asgi

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 0.5


class HangingEngine(FakeEngine):
    """A FakeEngine whose step() blocks while `hang` is set (a stuck collective or kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = threading.Event()
        self.released = threading.Event()

    def step(self):
        if self.hang.is_set():
            self.released.wait(30)
        return super().step()


def _serve(engine: FakeEngine):
    client = LocalEngineClient(engine, max_model_len=engine.max_model_len, vocab_size=257)
    return serve_asgi(build_app(client, "tiny", [make_router(client, timeout_s=TIMEOUT_S)]))


def _complete(base: str, max_tokens: int, results: list) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": max_tokens}
    results.append(httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code)


def test_idle_and_stepping_engines_are_healthy_and_a_hung_one_fails():
    engine = HangingEngine()
    with _serve(engine) as base:
        idle = httpx.get(f"{base}/health/progress", timeout=10)
        assert idle.status_code == 200 and idle.json()["pending"] == 0
        results: list[int] = []
        _complete(base, 8, results)  # a working engine answers
        assert results == [200]
        assert httpx.get(f"{base}/health/progress", timeout=10).status_code == 200

        engine.hang.set()
        worker = threading.Thread(target=_complete, args=(base, 8, results))
        worker.start()
        wait_for(lambda: httpx.get(f"{base}/health/progress", timeout=10).status_code == 503, timeout=20)
        hung = httpx.get(f"{base}/health/progress", timeout=10)
        assert (
            "no progress" in hung.json()["error"]["message"]
            and "1 request" in hung.json()["error"]["message"]
        )
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # the socket alone looks fine

        engine.hang.clear()
        engine.released.set()  # the step completes: progress again, the request finishes
        worker.join(30)
        assert results == [200, 200]
        assert httpx.get(f"{base}/health/progress", timeout=10).status_code == 200


def test_slow_steps_under_the_limit_stay_healthy():
    engine = FakeEngine(step_delay=0.05)  # 10x shorter than the limit
    with _serve(engine) as base:
        results: list[int] = []
        worker = threading.Thread(target=_complete, args=(base, 40, results))
        worker.start()
        codes = []
        while worker.is_alive():
            codes.append(httpx.get(f"{base}/health/progress", timeout=10).status_code)
        worker.join()
        assert results == [200] and codes and set(codes) == {200}


def test_clock_counts_only_while_work_waits():
    now = [100.0]
    clock = ProgressClock(clock=lambda: now[0])
    now[0] = 160.0
    assert clock.stalled_for(pending=0) == 0.0
    assert clock.stalled_for(pending=2) == 60.0
    clock.mark()
    assert clock.stalled_for(pending=2) == 0.0


def test_timeout_from_environment(monkeypatch):
    monkeypatch.delenv("MOEFLEET_PROGRESS_TIMEOUT", raising=False)
    assert timeout_from_environment() == 300.0
    monkeypatch.setenv("MOEFLEET_PROGRESS_TIMEOUT", "45")
    assert timeout_from_environment() == 45.0
    for bad in ("soon", "0"):
        monkeypatch.setenv("MOEFLEET_PROGRESS_TIMEOUT", bad)
        with pytest.raises(ValueError, match="MOEFLEET_PROGRESS_TIMEOUT"):
            timeout_from_environment()
