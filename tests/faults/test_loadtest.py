"""`moefleet loadtest`: its pure parts against hand-computed values / numpy, then a real run against a real
`moefleet serve` (tiny model, CPU) with a third of the clients hanging up mid-stream: nothing hung, nothing
lost, every request accounted for on both sides, and the server's KV cache back to 0 afterwards."""

from __future__ import annotations

import json
import random
import subprocess
import threading

import httpx
import numpy as np
import pytest
from faults.conftest import MOEFLEET, metric, record, wait_until
from moefleet.engine.loadtest.plan import Distribution, parse_distribution, plan_requests
from moefleet.engine.loadtest.report import RequestResult, percentile, summarize


@pytest.mark.parametrize(
    "text,expected",
    [
        ("64", Distribution("fixed", 64)),
        ("uniform:16-256", Distribution("uniform", 16, 256)),
        ("normal:128,32", Distribution("normal", 128, 32)),
    ],
)
def test_parse_distribution(text, expected):
    assert parse_distribution(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["0", "uniform:9-3", "uniform:5", "normal:1", "poisson:3", "x"])
def test_bad_distribution_says_what_is_expected(text):
    with pytest.raises(ValueError, match="uniform:LOW-HIGH"):
        parse_distribution(text)


def test_plan_is_seeded_and_leaves_mid_stream():
    args = (300, parse_distribution("uniform:4-40"), parse_distribution("uniform:8-64"), 50.0, 1 / 3, 7)
    plan = plan_requests(*args)
    assert plan == plan_requests(*args)  # same seed, same load
    assert plan != plan_requests(*args[:-1], 8)
    leaving = [p for p in plan if p.leave_after_chunks is not None]
    assert len(leaving) == 100
    assert all(1 <= p.leave_after_chunks <= max(1, p.max_tokens // 2) for p in leaving)
    assert all(4 <= p.prompt_len <= 40 and 8 <= p.max_tokens <= 64 for p in plan)
    gaps = np.diff([p.send_at_s for p in plan])
    assert (gaps >= 0).all() and 1 / 50 * 0.7 < gaps.mean() < 1 / 50 * 1.3  # Poisson at 50 req/s
    assert all(
        p.send_at_s == 0
        for p in plan_requests(5, Distribution("fixed", 1), Distribution("fixed", 1), 0, 0, 0)
    )


def test_percentile_matches_numpy():
    rng = random.Random(3)
    for n in (1, 2, 5, 100):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_counts():
    results = [
        RequestResult(
            0, finish_reason="length", output_tokens=10, ttft_s=0.1, itl_s=[0.01, 0.03], latency_s=1
        ),
        RequestResult(1, left_early=True, output_tokens=3, ttft_s=0.3),
        RequestResult(2, error="http 503: draining"),
        RequestResult(3, hung=True, error="hung: no end within the request timeout"),
        RequestResult(4, output_tokens=2, latency_s=2),  # ended with neither finish_reason nor error: lost
    ]
    summary = summarize(results, wall_s=2.0)
    assert (summary["completed"], summary["left_early"], summary["hung"], summary["lost"]) == (2, 1, 1, 1)
    assert summary["errors"] == 1 and summary["errors_by_kind"] == {"http 503": 1}
    assert summary["output_tokens"] == 15 and summary["output_tokens_per_s"] == 7.5
    assert summary["ttft_s"]["p50"] == pytest.approx(0.2) and summary["itl_s"]["p50"] == pytest.approx(0.02)


def _loadtest(
    url: str, tmp_path, requests: int, concurrency: int, timeout: float, output_len: str, rate: float = 0
) -> dict:
    out = tmp_path / f"loadtest-{requests}.json"
    command = [
        MOEFLEET,
        "loadtest",
        "--url",
        url,
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
    ]
    command += ["--prompt-len", "uniform:4-24", "--output-len", output_len, "--ignore-eos"]
    command += ["--rate", str(rate)] if rate else []
    command += [
        "--disconnect-fraction",
        "0.3333",
        "--request-timeout",
        "120",
        "--seed",
        "1",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "time to first token" in done.stdout and "lost 0" in done.stdout
    return json.loads(out.read_text())


def _check_accounted(
    server_url: str, summary: dict, requests: int, before: dict[str, float], max_refused: int = 0
) -> float:
    """Nothing hung or lost; the server counted the same; its KV cache drains to 0. Seconds until it did.
    `max_refused`: clean 503 refusals (OpenAI error body, never reached the engine) tolerated - a gateway
    whose only group is too slow to answer its health polls refuses new requests rather than queue them."""
    refused = summary["errors_by_kind"].get("http 503", 0)
    assert (summary["hung"], summary["lost"], summary["errors"] - refused) == (0, 0, 0), summary
    assert refused <= max_refused, summary
    requests -= refused
    planned_to_leave = round((requests + refused) * 0.3333)
    # A client whose stream ended before it reached its leaving point (some tokens decode to no text, so
    # fewer content chunks than tokens) simply completed: every request is one or the other.
    leaving, completed = summary["left_early"], summary["completed"]
    low = 0.9 * planned_to_leave - refused
    assert leaving + completed == requests and low <= leaving <= planned_to_leave, summary
    assert summary["finish_reasons"] == {"length": completed}  # ignore_eos: every one ran to max_tokens

    def settled() -> bool:
        running = metric(server_url, "moefleet_num_requests_running")
        waiting = metric(server_url, "moefleet_num_requests_waiting")
        return running == waiting == 0 and metric(server_url, "moefleet_kv_cache_blocks_used") == 0

    kv_zero_s = wait_until(settled, timeout=15, interval=0.1)
    counted = {
        r: metric(server_url, "moefleet_requests_total", f'finish_reason="{r}"') - before[r] for r in before
    }
    # Every request ended once on the server too. A client that hung up after the server had already produced
    # its last token is a normal finish there, so "abort" is at most the number of clients that left.
    assert counted["error"] == counted["stop"] == 0, counted
    assert counted["length"] + counted["abort"] == requests, counted
    assert completed <= counted["length"] and counted["abort"] <= leaving, counted
    return kv_zero_s


def _finished(server_url: str) -> dict[str, float]:
    reasons = ("length", "abort", "stop", "error")
    return {r: metric(server_url, "moefleet_requests_total", f'finish_reason="{r}"') for r in reasons}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_loadtest_with_vanishing_clients(shared_server, tmp_path):
    url = shared_server.base_url
    before = _finished(url)
    summary = _loadtest(url, tmp_path, requests=90, concurrency=48, timeout=150, output_len="uniform:8-32")
    kv_zero_s = _check_accounted(url, summary, 90, before)
    record("loadtest_vanishing_clients", requests=90, concurrency=48, left_early=summary["left_early"],
           hung=0, lost=0, kv_blocks_leaked=0, kv_zero_after_s=round(kv_zero_s, 2),
           ttft_p99_ms=round(summary["ttft_s"]["p99"] * 1000, 1),
           output_tok_per_s=round(summary["output_tokens_per_s"], 1))  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_thousand_concurrent_streams_on_one_server(shared_server, tmp_path):
    """The issue's 1,000 concurrent streams, against one server (the gateway and a local fleet do not exist
    yet): all 1,000 connections open at once, a third hang up mid-stream; short outputs keep it bounded."""
    url = shared_server.base_url
    before = _finished(url)
    summary = _loadtest(url, tmp_path, requests=1000, concurrency=1000, timeout=220, output_len="uniform:4-8")
    kv_zero_s = _check_accounted(url, summary, 1000, before)
    record("loadtest_1000_streams_one_server", requests=1000, concurrency=1000, left_early=summary["left_early"],
           hung=0, lost=0, kv_blocks_leaked=0, kv_zero_after_s=round(kv_zero_s, 2), wall_s=round(summary["wall_s"], 1),
           ttft_p50_s=round(summary["ttft_s"]["p50"], 1), ttft_p99_s=round(summary["ttft_s"]["p99"], 1))  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_thousand_concurrent_streams_through_the_gateway(shared_server, shared_gateway, tmp_path):
    """The issue's figure through a local fleet: `moefleet gateway` in front of the group, 1,000 streams open at
    once through it, a third hang up mid-stream (the gateway must close their upstream requests so the engine
    aborts them and frees their KV); accounted for on the engine's side: 0 hung, 0 lost, 0 KV pages leaked.
    Clean 503 refusals (OpenAI error body, the request never reached the engine) are counted, not failed: on
    this overloaded 2-core machine the engine, busy with 1,000 streams, misses health polls (2 s timeout) and
    the gateway then takes its only group out of rotation for new requests until a poll succeeds (load
    shedding; docs/reliability.md). They must stay a minority."""
    before = _finished(shared_server.base_url)
    peak = {"open": 0.0}
    stop = threading.Event()

    def sample() -> None:  # requests open in the engine (running + queued), while the load runs
        while not stop.wait(0.5):
            try:
                open_now = sum(
                    metric(shared_server.base_url, f"moefleet_num_requests_{s}")
                    for s in ("running", "waiting")
                )
            except (httpx.HTTPError, AssertionError):
                continue
            peak["open"] = max(peak["open"], open_now)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = _loadtest(shared_gateway.base_url, tmp_path, requests=1000, concurrency=1000, timeout=280,
                            output_len="uniform:4-8")  # fmt: skip
    finally:
        stop.set()
        sampler.join(15)
    kv_zero_s = _check_accounted(shared_server.base_url, summary, 1000, before, max_refused=499)
    # The client held up to 1,000 connections at once; the engine's sampled peak (running + queued; requests
    # still on their way through the gateway are not in it yet, and a busy /metrics is sampled coarsely) shows
    # that a large share of the load was open there at the same time, not passed through one by one (248 seen
    # at the worst on this 2-core machine, where the 503s above take part of the load away).
    assert peak["open"] > 128, peak
    record("loadtest_1000_streams_through_gateway", requests=1000, concurrency=1000,
           left_early=summary["left_early"], hung=0, lost=0, refused_503=summary["errors"], kv_blocks_leaked=0,
           kv_zero_after_s=round(kv_zero_s, 2), wall_s=round(summary["wall_s"], 1), ttft_p50_s=round(summary["ttft_s"]["p50"], 1),
           ttft_p99_s=round(summary["ttft_s"]["p99"], 1), peak_open_in_engine=int(peak["open"]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode", [["--endpoint", "chat"], ["--no-stream"]], ids=["chat-stream", "completions-json"]
)
def test_loadtest_chat_and_plain_json(shared_server, tmp_path, mode):
    out = tmp_path / "summary.json"
    command = [MOEFLEET, "loadtest", "--url", shared_server.base_url + "/v1", "--requests", "12"]
    command += [
        "--concurrency",
        "4",
        "--output-len",
        "uniform:2-6",
        "--ignore-eos",
        "--json",
        str(out),
        *mode,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert (summary["completed"], summary["errors"], summary["hung"], summary["lost"]) == (12, 0, 0, 0)
    assert summary["finish_reasons"] == {"length": 12}
    assert 12 * 2 <= summary["output_tokens"] <= 12 * 6  # usage counts (streams: include_usage), not guesses


def test_loadtest_usage_errors(capsys):
    from moefleet.engine.cli import main

    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--prompt-len", "uniform:9-3"]) == 2
    assert "bad length distribution 'uniform:9-3'" in capsys.readouterr().err
    assert (
        main(["loadtest", "--url", "http://127.0.0.1:9", "--no-stream", "--disconnect-fraction", "0.5"]) == 2
    )
    assert "needs streams" in capsys.readouterr().err
    assert main(["loadtest", "--url", "http://127.0.0.1:9"]) == 2  # nothing listens: no model list
    err = capsys.readouterr().err
    assert "cannot list the models at http://127.0.0.1:9" in err and "pass --model" in err
