"""Graceful drain of `moefleet gateway` (real gateway process over a real engine: tiny model, CPU).

SIGTERM while streams run through the gateway: its /health turns 503 at once, a new request gets 503 in
OpenAI's error shape, the streams finish every token, the gateway exits 0. With a short --drain-timeout the
streams are cut with finish_reason "abort" then [DONE], a non-streamed request gets 503, the engine frees the
cut requests' KV, exit 0. A second SIGTERM cuts at once.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from disaggregation.pd_fleet import PROMPTS, kv_idle, pd_groups
from faults.conftest import (
    MODEL,
    GatewayProcess,
    ServeProcess,
    Stream,
    open_streams,
    record,
    refuses_new_work,
    status_of,
    wait_until,
)
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

STREAMS = 4
FINISHING = 240  # tokens: seconds of decoding on CPU, so the streams still run while the refusals are checked
PD_FINISHING = 120
GATEWAY_PROMPTS = [[5 + i, 6, 7] for i in range(STREAMS)]


def _gateway(engine: ServeProcess, tmp_path, drain_timeout: float) -> GatewayProcess:
    extra = ["--backend", engine.base_url, "--drain-timeout", str(drain_timeout), "--log-level", "warning"]
    gateway = GatewayProcess(tmp_path / "gateway.log", extra)
    gateway.wait_ready(timeout=120)
    return gateway


def test_gateway_sigterm_lets_streams_finish(shared_server, tmp_path):
    gateway = _gateway(shared_server, tmp_path, drain_timeout=90)
    try:
        streams = open_streams(
            gateway, prompts=GATEWAY_PROMPTS, max_tokens=FINISHING
        )  # long enough to still run during the checks
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        not_ready_s = refuses_new_work(gateway, "retry")
        running = sum(s.ended is None for s in streams)
        for stream in streams:
            assert stream.join(120), "a stream hung during the gateway's drain"
        code = gateway.wait(timeout=30)
        exited_s = time.monotonic() - signalled
    finally:
        gateway.kill()
    assert running > 0, "the streams ended before the drain was checked: the test proved nothing"
    for stream in streams:  # every token of every stream arrived, ended normally
        assert (stream.status, stream.tokens, stream.finish_reason, stream.done) == (
            200,
            FINISHING,
            "length",
            True,
        )
        assert stream.error is None and stream.exception is None
    assert code == 0, gateway.log()[-3000:]
    last_stream_s = max(s.ended or 0 for s in streams) - signalled
    record(
        "gateway_drain_finishes_streams",
        not_ready_s=round(not_ready_s, 2),
        streams_lost=0,
        last_stream_end_s=round(last_stream_s, 2),
        exit_s=round(exited_s, 2),
        exit_code=code,
    )


def test_gateway_short_drain_timeout_cuts_streams_with_abort(shared_server, tmp_path):
    drain_timeout = 1.0
    gateway = _gateway(shared_server, tmp_path, drain_timeout=drain_timeout)
    plain: dict = {}

    def plain_request() -> None:  # a non-streamed request in flight too: cut with a 503 error
        body = {"model": tiny_model_dir(MODEL).name, "prompt": [9, 8, 7], "max_tokens": 1000}
        plain["status"], plain["reply"] = status_of(
            gateway.base_url + "/v1/completions", "POST", json=body | {"ignore_eos": True}
        )

    waiter = threading.Thread(target=plain_request, daemon=True)
    try:
        waiter.start()
        streams = open_streams(
            gateway, prompts=GATEWAY_PROMPTS, max_tokens=1000
        )  # minutes of decoding: cannot finish in the drain
        signalled = time.monotonic()
        gateway.signal(signal.SIGTERM)
        for stream in streams:
            assert stream.join(60), "a stream hung after the gateway's drain timeout"
        waiter.join(60)
        code = gateway.wait(timeout=30)
        exited_s = time.monotonic() - signalled
        # The gateway closed its upstream requests: the engine aborted them and freed their KV.
        freed_s = wait_until(lambda: kv_idle(shared_server.base_url), 30, 0.1)
    finally:
        gateway.kill()
    for stream in streams:  # cut short, but closed properly: finish_reason "abort", then [DONE]
        assert (stream.status, stream.finish_reason, stream.done) == (200, "abort", True), stream
        assert 0 < stream.tokens < 1000 and stream.error is None and stream.exception is None
    assert plain["status"] == 503, plain
    assert plain["reply"]["error"]["type"] == "service_unavailable_error"
    assert "retry" in plain["reply"]["error"]["message"]
    assert code == 0, gateway.log()[-3000:]
    ended_s = max(s.ended or 0 for s in streams) - signalled
    assert drain_timeout <= ended_s < drain_timeout + 10, ended_s
    record("gateway_drain_timeout_aborts", drain_timeout_s=drain_timeout, streams_ended_s=round(ended_s, 2),
           exit_s=round(exited_s, 2), exit_code=code, engine_kv_freed_s=round(freed_s, 2))  # fmt: skip


def test_gateway_second_sigterm_forces_exit(shared_server, tmp_path):
    gateway = _gateway(shared_server, tmp_path, drain_timeout=120)
    try:
        streams = open_streams(gateway, prompts=GATEWAY_PROMPTS, max_tokens=1000)
        gateway.signal(signal.SIGTERM)
        refuses_new_work(gateway, "retry")
        forced = time.monotonic()
        gateway.signal(signal.SIGTERM)
        for stream in streams:
            assert stream.join(30), "a stream hung after the forced stop"
        code = gateway.wait(timeout=30)
        exited_s = time.monotonic() - forced
        wait_until(lambda: kv_idle(shared_server.base_url), 30, 0.1)
    finally:
        gateway.kill()
    for stream in streams:
        assert (stream.finish_reason, stream.done) == ("abort", True), stream
    assert code == 0, gateway.log()[-3000:]
    assert "forced stop" in gateway.log()
    assert exited_s < 20, exited_s  # not the 120 s drain timeout
    record("gateway_second_sigterm_forces", exit_s=round(exited_s, 2), exit_code=code,
           streams_ended_s=round(max(s.ended or 0 for s in streams) - forced, 2))  # fmt: skip


def test_gateway_sigterm_in_disaggregated_mode_lets_streams_finish(tmp_path):
    with pd_groups(MODEL, tmp_path, ranks=1) as groups:
        urls = ["--prefill", groups.prefill.base_url, "--decode", groups.decode.base_url]
        gateway = GatewayProcess(tmp_path / "gateway.log", [*urls, "--drain-timeout", "90"])
        try:
            gateway.wait_ready(timeout=120)
            streams = [
                Stream(gateway.base_url, MODEL, PD_FINISHING, prompt=PROMPTS[i % 2]).start() for i in range(2)
            ]
            for (
                stream
            ) in streams:  # prefilled by the prefill group, its KV moved, decoding on the decode group
                assert stream.first_token.wait(120) and stream.tokens > 0, (stream, gateway.log()[-2000:])
            signalled = time.monotonic()
            gateway.signal(signal.SIGTERM)
            not_ready_s = refuses_new_work(gateway, "retry")
            running = sum(s.ended is None for s in streams)
            for stream in streams:
                assert stream.join(120), "a stream hung during the gateway's drain"
            code = gateway.wait(timeout=30)
            exited_s = time.monotonic() - signalled
            freed_s = wait_until(lambda: kv_idle(groups.prefill.base_url, groups.decode.base_url), 30, 0.1)
        finally:
            gateway.kill()
    assert running > 0, "the streams ended before the drain was checked: the test proved nothing"
    for stream in streams:
        assert (stream.status, stream.tokens, stream.finish_reason, stream.done) == (
            200,
            PD_FINISHING,
            "length",
            True,
        )
        assert stream.error is None and stream.exception is None
    assert code == 0, gateway.log()[-3000:]
    last_stream_s = max(s.ended or 0 for s in streams) - signalled
    record("gateway_drain_disaggregated", not_ready_s=round(not_ready_s, 2), streams_lost=0, exit_code=code,
           last_stream_end_s=round(last_stream_s, 2), exit_s=round(exited_s, 2), kv_freed_s=round(freed_s, 2))  # fmt: skip
