"""`moefleet serve` as a real process: the `make run` path (make-tiny-model, then serve --print-examples)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server.conftest import wait_for_banner_url

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))


def test_make_tiny_model_then_serve(tmp_path):
    model_dir = tmp_path / "tiny-qwen3-moe"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    made = subprocess.run(
        [MOEFLEET, "make-tiny-model", "--arch", "qwen3_moe", "--out", str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    assert (model_dir / "config.json").is_file()

    process = subprocess.Popen(
        [
            MOEFLEET,
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--log-level",
            "warning",
            "--print-examples",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        base_url = wait_for_banner_url(process)
        assert httpx.get(base_url + "/health", timeout=10).json() == {"status": "ok"}
        models = httpx.get(base_url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-qwen3-moe"]  # served name = directory basename
        reply = httpx.post(
            base_url + "/v1/chat/completions",
            json={
                "model": "tiny-qwen3-moe",
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 5,
            },
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= reply.json()["usage"]["completion_tokens"] <= 5
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0
