"""Graceful drain of a single-process `moefleet serve` (real process, tiny model, CPU).

SIGTERM while streams run: /health turns 503 at once, new requests get 503 in OpenAI's error shape, the
streams finish every token, the process exits 0. With a short --drain-timeout the streams end with
finish_reason "abort" (still a proper end of stream), exit 0. A second SIGTERM forces the abort now.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from faults.conftest import MODEL, ServeProcess, open_streams, record, refuses_new_work, status_of
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

STREAMS = 4
PROMPTS = [[5, 6, 7, 8]] * STREAMS


def _start(tmp_path, drain_timeout: float) -> ServeProcess:
    server = ServeProcess(
        tiny_model_dir(MODEL), tmp_path / "serve.log", ["--drain-timeout", str(drain_timeout)]
    )
    server.wait_ready(timeout=120)
    return server


def test_sigterm_lets_streams_finish(tmp_path):
    server = _start(tmp_path, drain_timeout=60)
    try:
        streams = open_streams(
            server, prompts=PROMPTS, max_tokens=400
        )  # long enough to still run during the checks
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        not_ready_s = refuses_new_work(server)
        for stream in streams:
            assert stream.join(90), "a stream hung during the drain"
        code = server.wait(timeout=30)
        exited_s = time.monotonic() - signalled
    finally:
        server.kill()
    for stream in streams:  # every token of every stream arrived, ended normally
        assert (stream.status, stream.tokens, stream.finish_reason, stream.done) == (200, 400, "length", True)
        assert stream.error is None and stream.exception is None
    assert code == 0, server.log()[-3000:]
    assert "exit code 17" not in server.log()
    last_stream_s = max(s.ended or 0 for s in streams) - signalled
    record(
        "drain_finishes_streams",
        not_ready_s=round(not_ready_s, 2),
        streams_lost=0,
        last_stream_end_s=round(last_stream_s, 2),
        exit_s=round(exited_s, 2),
    )


def test_short_drain_timeout_aborts_streams(tmp_path):
    drain_timeout = 1.0
    server = _start(tmp_path, drain_timeout=drain_timeout)
    plain: dict = {}

    def plain_request() -> None:  # a non-streamed request in flight too: its text so far, finish_reason abort
        body = {
            "model": tiny_model_dir(MODEL).name,
            "prompt": [9, 8, 7],
            "max_tokens": 1000,
            "ignore_eos": True,
        }
        plain["status"], plain["reply"] = status_of(server.base_url + "/v1/completions", "POST", json=body)

    waiter = threading.Thread(target=plain_request, daemon=True)
    try:
        waiter.start()
        streams = open_streams(
            server, prompts=PROMPTS, max_tokens=1000
        )  # minutes of decoding: cannot finish in the drain
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)  # (refusals are checked above; this server stops within a second)
        for stream in streams:
            assert stream.join(60), "a stream hung after the drain timeout"
        waiter.join(60)
        code = server.wait(timeout=30)
        exited_s = time.monotonic() - signalled
    finally:
        server.kill()
    for stream in streams:  # cut short, but closed properly: finish_reason "abort", then [DONE]
        assert (stream.status, stream.finish_reason, stream.done) == (200, "abort", True), stream
        assert 0 < stream.tokens < 1000 and stream.error is None and stream.exception is None
    assert plain["status"] == 200, plain
    assert plain["reply"]["choices"][0]["finish_reason"] == "abort"
    assert 0 < plain["reply"]["usage"]["completion_tokens"] < 1000
    assert code == 0, server.log()[-3000:]
    ended_s = max(s.ended or 0 for s in streams) - signalled
    assert ended_s < drain_timeout + 10, ended_s
    record("drain_timeout_aborts", drain_timeout_s=drain_timeout, streams_ended_s=round(ended_s, 2),
           exit_s=round(exited_s, 2))  # fmt: skip


def test_second_sigterm_forces_exit(tmp_path):
    server = _start(tmp_path, drain_timeout=120)
    try:
        streams = open_streams(server, prompts=PROMPTS, max_tokens=1000)
        server.signal(signal.SIGTERM)
        refuses_new_work(server)
        forced = time.monotonic()
        server.signal(signal.SIGTERM)
        for stream in streams:
            assert stream.join(30), "a stream hung after the forced stop"
        code = server.wait(timeout=30)
        exited_s = time.monotonic() - forced
    finally:
        server.kill()
    for stream in streams:
        assert (stream.finish_reason, stream.done) == ("abort", True), stream
    assert code == 0, server.log()[-3000:]
    assert "forced stop" in server.log()
    assert exited_s < 20, exited_s  # not the 120 s drain timeout
    record("second_sigterm_forces", exit_s=round(exited_s, 2),
           streams_ended_s=round(max(s.ended or 0 for s in streams) - forced, 2))  # fmt: skip
