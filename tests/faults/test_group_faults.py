"""Faults of a 4-rank serving group (real `moefleet serve` processes, gloo on CPU, tiny model).

- A rank SIGKILLed mid-stream: every client gets an error event or a clean close within the watchdog timeout,
  never a hang; the group exits 17 (a real peer failure: "restart the group whole").
- SIGTERM of a 2-node group (node 1 first, as a lone pod eviction would, then node 0): node 1 asks node 0 to
  drain the group, node 0 turns not-ready, the streams in flight finish, every process exits 0 (not 17).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from faults.conftest import MODEL, ServeProcess, Stream, record, status_of, wait_until
from moefleet.engine.distributed.watchdog import EXIT_CODE
from support.reference import free_port
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.multiprocess]

WATCHDOG_TIMEOUT_S = 10.0  # Watchdog's default timeout_s


def _node(tmp_path, nnodes: int, node_rank: int, nproc: int, port: int, drain_timeout: float) -> ServeProcess:
    extra = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc)]
    extra += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--drain-timeout", str(drain_timeout)]
    return ServeProcess(tiny_model_dir(MODEL), tmp_path / f"node{node_rank}.log", extra)


def test_rank_killed_mid_stream_fails_clients_fast_and_exits_17(tmp_path):
    node = _node(tmp_path, nnodes=1, node_rank=0, nproc=4, port=free_port(), drain_timeout=30)
    try:
        url = node.wait_ready(timeout=180)
        model = tiny_model_dir(MODEL).name
        streams = [Stream(url, model, 1000, prompt=[5 + i, 6, 7]).start() for i in range(4)]
        for stream in streams:
            assert stream.first_token.wait(90) and stream.tokens > 0, node.log()[-3000:]
        victims = node.children()
        assert len(victims) == 3, victims  # local ranks 1..3
        killed = time.monotonic()
        os.kill(victims[1], signal.SIGKILL)  # local rank 2, in the middle of decoding
        for stream in streams:
            assert stream.join(WATCHDOG_TIMEOUT_S + 20), "a client hung after a rank died"
        code = node.wait(timeout=60)
        exited_s = time.monotonic() - killed
    finally:
        node.kill()
    for stream in streams:  # an error event (then [DONE]) or a closed connection; never a normal finish
        assert stream.finish_reason is None, stream
        assert stream.error is not None or stream.exception is not None, stream
        if stream.error is not None:
            assert stream.error["type"] == "service_unavailable_error" and stream.done
    time_to_error = max(s.ended or 0 for s in streams) - killed
    assert time_to_error < WATCHDOG_TIMEOUT_S + 5, time_to_error
    assert code == EXIT_CODE, node.log()[-3000:]
    assert f"exit code {EXIT_CODE}, restart the group whole" in node.log()
    record("rank_killed_mid_stream", clients=len(streams), clients_hung=0,
           time_to_error_s=round(time_to_error, 2), time_to_exit_s=round(exited_s, 2), exit_code=code)  # fmt: skip


def test_sigterm_drains_the_whole_group_and_exits_0(tmp_path):
    port = free_port()
    nodes = [
        _node(tmp_path, nnodes=2, node_rank=rank, nproc=1, port=port, drain_timeout=60) for rank in (0, 1)
    ]
    try:
        front_end, worker = (node.wait_ready(timeout=180) for node in nodes)
        model = tiny_model_dir(MODEL).name
        streams = [Stream(front_end, model, 200, prompt=[5 + i, 6, 7]).start() for i in range(4)]
        for stream in streams:
            assert stream.first_token.wait(90) and stream.tokens > 0, nodes[0].log()[-3000:]
        signalled = time.monotonic()
        nodes[1].signal(
            signal.SIGTERM
        )  # node 1 alone: it cannot leave without the group, so the group drains
        worker_not_ready_s = wait_until(lambda: status_of(worker + "/health")[0] == 503, timeout=10)
        front_not_ready_s = wait_until(lambda: status_of(front_end + "/health")[0] == 503, timeout=10)
        refused, body = status_of(front_end + "/v1/completions", "POST", json={"model": model, "prompt": [1]})
        assert refused == 503 and "draining" in body["error"]["message"], body
        nodes[0].signal(signal.SIGTERM)  # Kubernetes terminates every pod of the group: a repeat is harmless
        for stream in streams:
            assert stream.join(120), "a stream hung during the group drain"
        codes = [node.wait(timeout=60) for node in nodes]
        exited_s = time.monotonic() - signalled
    finally:
        for node in nodes:
            node.kill()
    for stream in streams:
        assert (stream.status, stream.tokens, stream.finish_reason, stream.done) == (200, 200, "length", True)
    logs = [node.log() for node in nodes]
    assert codes == [0, 0], "\n---\n".join(log[-3000:] for log in logs)
    assert not any(f"exit code {EXIT_CODE}" in log for log in logs)
    record("group_sigterm_drains", ranks=2, worker_not_ready_s=round(worker_not_ready_s, 2),
           front_end_not_ready_s=round(front_not_ready_s, 2), streams_lost=0,
           last_stream_end_s=round(max(s.ended or 0 for s in streams) - signalled, 2),
           exit_s=round(exited_s, 2))  # fmt: skip
