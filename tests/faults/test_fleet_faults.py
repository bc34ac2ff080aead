"""Faults through the whole stack: gateway + engine groups as real processes (gloo on CPU, tiny model).

- a rank of a 4-rank group SIGKILLed mid-stream: that group's clients get an error event, the other group's
  streams finish, and every new request through the gateway is served by the other group;
- the decode group killed during a KV transfer (frozen with SIGSTOP once the prefill side is pushing, then
  SIGKILLed): clients get an error within seconds, the prefill group leaks no KV pages;
- the prefill group killed after the transfer: the streams in flight finish on the decode group, which leaks
  no KV pages; new requests are served whole by the decode group;
- the gateway SIGKILLed under load and started again: clients see connection errors (never a hang), the engine
  frees every KV page of the cut requests, and every client's retry succeeds once the gateway is back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from disaggregation.pd_fleet import PROMPTS, body, kv_gauges, kv_idle, pd_config, pd_groups
from faults.conftest import MODEL, MOEFLEET, ServeProcess, Stream, metric, record, wait_until
from gateway.conftest import serve_gateway
from moefleet.engine.distributed.watchdog import EXIT_CODE
from support.reference import free_port
from support.tiny_models import tiny_model_dir

from moefleet.gateway_schema import mixed_config

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow, pytest.mark.multiprocess]

WATCHDOG_TIMEOUT_S = 10.0


def _kill_group(group: ServeProcess, sig: int = signal.SIGKILL) -> None:
    for pid in [group.process.pid, *group.children()]:
        os.kill(pid, sig)


def _complete(
    url: str, prompt: list[int], max_tokens: int = 8, model: str = MODEL, timeout: float = 120
) -> tuple[int, int]:
    """(status, tokens) of one plain completion."""
    reply = httpx.post(
        url + "/v1/completions", json=body(model, prompt, max_tokens=max_tokens), timeout=timeout
    )
    tokens = len(reply.json()["choices"][0]["token_ids"]) if reply.status_code == 200 else 0
    return reply.status_code, tokens


def _finished(url: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("moefleet_requests_total{"))


def test_rank_killed_in_a_4_rank_group_new_requests_go_to_another_group(tmp_path):
    model = tiny_model_dir(MODEL)
    four = ServeProcess(
        model,
        tmp_path / "four.log",
        ["--nproc-per-node", "4", "--master-port", str(free_port()), "--served-model-name", MODEL],
    )
    one = ServeProcess(model, tmp_path / "one.log", ["--served-model-name", MODEL])
    try:
        four_url, one_url = four.wait_ready(timeout=240), one.wait_ready(timeout=240)
        config = mixed_config([four_url, one_url])
        with serve_gateway(config) as (url, gateway):
            wait_until(lambda: all(b.healthy for b in gateway.pool.backends.values()), timeout=20)
            streams = [Stream(url, MODEL, 400, prompt=[5 + i, 6, 7]).start() for i in range(4)]
            for stream in streams:
                assert stream.first_token.wait(120) and stream.tokens > 0, stream
            assert metric(four_url, "moefleet_num_requests_running") >= 1  # least-load spread them
            served_before = _finished(one_url)
            killed = time.monotonic()
            os.kill(four.children()[1], signal.SIGKILL)  # local rank 2, mid-decode
            # New requests right away: each is served by the other group (a 503 of the broken group before
            # the first byte is retried there; then the broken group leaves the pool).
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda i: _complete(url, [9 + i, 10, 11]), range(8)))
            assert results == [(200, 8)] * 8, results
            for stream in streams:
                assert stream.join(WATCHDOG_TIMEOUT_S + 20), "a client hung after a rank died"
            wait_until(lambda: not gateway.pool.backends["backend-0"].healthy, 30)  # out of the pool
            code = four.wait(timeout=60)
        assert _finished(one_url) - served_before >= 8  # the new requests (and the streams there) ended there
    finally:
        four.kill()
        one.kill()
    cut = [s for s in streams if s.finish_reason is None]
    finished = [s for s in streams if s.finish_reason == "length" and s.tokens == 400]
    assert len(cut) + len(finished) == len(streams) and cut, streams
    for stream in cut:
        assert stream.error is not None and stream.done or stream.exception is not None, stream
    time_to_error = max(s.ended or 0 for s in cut) - killed
    assert time_to_error < WATCHDOG_TIMEOUT_S + 5
    assert code == EXIT_CODE
    record("rank_killed_through_gateway", streams_cut=len(cut), streams_finished_elsewhere=len(finished),
           time_to_error_s=round(time_to_error, 2), new_requests_ok=8, new_requests_failed=0,
           exit_code=code)  # fmt: skip


def test_decode_group_killed_during_kv_transfer_leaks_nothing_on_the_prefill_side(tmp_path):
    with pd_groups(MODEL, tmp_path) as groups:
        prefill_url, decode_url = groups.prefill.base_url, groups.decode.base_url
        with serve_gateway(pd_config(prefill_url, decode_url)) as (url, _):
            assert _complete(url, PROMPTS[0]) == (200, 8)  # the fleet works
            _kill_group(groups.decode, signal.SIGSTOP)  # frozen: accepts connections, answers nothing
            streams = [Stream(url, MODEL, 64, prompt=PROMPTS[i % 2]).start() for i in range(2)]
            plain: list[tuple[int, int]] = []
            thread = threading.Thread(target=lambda: plain.append(_complete(url, PROMPTS[1])))
            thread.start()
            # The prefill group computed the prompts and is pushing their KV to the frozen receivers.
            wait_until(lambda: kv_gauges(prefill_url)["moefleet_num_requests_sending_kv"] == 3, 60, 0.1)
            assert kv_gauges(prefill_url)["moefleet_kv_cache_usage_ratio"] > 0
            killed = time.monotonic()
            _kill_group(groups.decode)
            for stream in streams:
                assert stream.join(30), "a client hung after the decode group died"
            thread.join(30)
            assert not thread.is_alive(), "a client hung after the decode group died"
            time_to_error = max([s.ended or 0 for s in streams]) - killed
            freed_s = wait_until(lambda: kv_idle(prefill_url), 30, 0.1)
    assert plain and plain[0][0] in (502, 503), plain
    for stream in streams:  # refused before the first byte: an OpenAI error answer, not a stream
        assert stream.status in (502, 503) and stream.tokens == 0, stream
    assert time_to_error < 10, time_to_error
    record("decode_killed_during_kv_transfer", clients=3, clients_hung=0, time_to_error_s=round(time_to_error, 2),
           prefill_kv_pages_leaked=0, prefill_kv_freed_s=round(freed_s, 2))  # fmt: skip


def test_prefill_group_killed_after_transfer_streams_finish_and_decode_leaks_nothing(tmp_path):
    with pd_groups(MODEL, tmp_path) as groups:
        prefill_url, decode_url = groups.prefill.base_url, groups.decode.base_url
        with serve_gateway(pd_config(prefill_url, decode_url)) as (url, gateway):
            streams = [Stream(url, MODEL, 200, prompt=PROMPTS[i % 2]).start() for i in range(4)]
            for stream in streams:
                assert stream.first_token.wait(120) and stream.tokens > 0, stream  # their KV has moved
            killed = time.monotonic()
            _kill_group(groups.prefill)
            for stream in streams:
                assert stream.join(120), "a client hung after the prefill group died"
            freed_s = wait_until(lambda: kv_idle(decode_url), 30, 0.1)
            # New requests: the prefill group cannot be reached, so the decode group serves them whole.
            results = [_complete(url, PROMPTS[i % 2]) for i in range(4)]
            assert not gateway.pool.backends["p0"].healthy
            wait_until(lambda: kv_idle(decode_url), 30, 0.1)
    for stream in streams:
        assert (stream.finish_reason, stream.tokens, stream.error) == ("length", 200, None), stream
    assert results == [(200, 8)] * 4, results
    record("prefill_killed_after_transfer", streams=4, streams_completed=4, requests_lost=0,
           decode_kv_pages_leaked=0, decode_kv_freed_s=round(freed_s, 2), new_requests_ok=4,
           last_stream_done_after_kill_s=round(max(s.ended or 0 for s in streams) - killed, 2))  # fmt: skip


def _gateway(port: int, backend: str, log: Path) -> subprocess.Popen:
    out = log.open("a")
    command = [MOEFLEET, "gateway", "--host", "127.0.0.1", "--port", str(port), "--backend", backend]
    return subprocess.Popen([*command, "--poll-interval", "0.2"], stdout=out, stderr=subprocess.STDOUT)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_gateway_restarted_under_load_clients_see_errors_then_recover_on_retry(shared_server, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = tiny_model_dir(MODEL).name  # the shared server's served name
    gateway = _gateway(port, shared_server.base_url, tmp_path / "gateway.log")
    try:
        wait_until(lambda: _healthy(url), 60, 0.2)
        streams = [Stream(url, model, 400, prompt=[5 + i, 6, 7]).start() for i in range(16)]
        for stream in streams:
            assert stream.first_token.wait(120) and stream.tokens > 0, stream
        killed = time.monotonic()
        gateway.kill()
        gateway.wait(10)
        for stream in streams:
            assert stream.join(15), "a client hung after the gateway died"
        time_to_error = max(s.ended or 0 for s in streams) - killed
        # The engine saw the gateway's connections close: every cut request aborted, its KV freed.
        freed_s = wait_until(lambda: kv_idle(shared_server.base_url), 30, 0.1)
        gateway = _gateway(port, shared_server.base_url, tmp_path / "gateway.log")

        def retry(i: int) -> tuple[int, int, int, float]:
            """(status, tokens, attempts, when): retry on connection errors, as a client library would."""
            deadline = time.monotonic() + 300
            attempt = 0
            while time.monotonic() < deadline:
                attempt += 1
                try:
                    status, tokens = _complete(url, [5 + i, 6, 7], max_tokens=16, model=model, timeout=20)
                    if status != 503:  # 503: up, but no healthy backend polled yet
                        return status, tokens, attempt, time.monotonic()
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            return 0, 0, attempt, time.monotonic()

        with ThreadPoolExecutor(16) as pool:
            retrying = [pool.submit(retry, i) for i in range(16)]  # clients retry while the gateway starts
            start_s = wait_until(lambda: _healthy(url), 300, 0.2)  # Python start-up: slow on a loaded machine
            ready = time.monotonic()
            retried = [future.result() for future in retrying]
        recovered_s = max(0.0, max(when for *_, when in retried) - ready)
    finally:
        gateway.kill()
        gateway.wait(10)
    for stream in streams:  # a connection error, never a normal end or a silent one
        assert stream.exception is not None and stream.finish_reason is None, stream
    assert time_to_error < 5, time_to_error
    assert [(s, t) for s, t, _, _ in retried] == [(200, 16)] * 16, retried
    record("gateway_restarted_under_load", clients=16, clients_hung=0, time_to_error_s=round(time_to_error, 2),
           engine_kv_freed_s=round(freed_s, 2), retries_ok=16, gateway_start_s=round(start_s, 2),
           all_retries_done_after_ready_s=round(recovered_s, 2), max_attempts=max(a for _, _, a, _ in retried))  # fmt: skip
