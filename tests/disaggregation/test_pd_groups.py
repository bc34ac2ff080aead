"""Prefill/decode disaggregation with multi-rank groups: `moefleet serve --nproc-per-node 2 --role prefill` and
`--role decode` (real processes, gloo on CPU, float32, tiny models) behind the gateway, over the `tcp` KV transfer.

Oracle: transformers greedy generation. Single and concurrent requests, streaming and not, a transfer into
decode rank 1 named by hand, the official openai client, KV usage back to 0 on both groups, clients that leave
mid-stream free KV on both sides, and the decode group killed mid-stream ends the client's stream with an error.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import openai
import pytest
from disaggregation.pd_fleet import (
    NEW_TOKENS,
    PROMPTS,
    body,
    check_greedy_through,
    hf_greedy,
    kv_gauges,
    kv_idle,
    kv_reservation,
    pd_config,
    pd_groups,
    start_group,
    stream_ids,
)
from faults.conftest import Stream, record, wait_until
from gateway.conftest import serve_gateway

pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_two_rank_prefill_and_decode_groups_match_transformers(name, tmp_path):
    expected = hf_greedy(name, PROMPTS)
    with (
        pd_groups(name, tmp_path) as groups,
        serve_gateway(pd_config(groups.prefill.base_url, groups.decode.base_url)) as (url, _),
    ):
        prefill_url, decode_url = groups.prefill.base_url, groups.decode.base_url
        boot = httpx.get(decode_url + "/v1/pd/bootstrap", timeout=10).json()
        assert boot["role"] == "decode" and boot["dp_size"] == 2 and len(set(boot["kv_ports"])) == 2
        assert httpx.get(prefill_url + "/v1/pd/bootstrap", timeout=10).json()["role"] == "prefill"

        check_greedy_through(url, name, expected)

        # By hand, into decode rank 1's receiver: the decode group places the request on that rank.
        transfer = uuid.uuid4().hex
        got: list[list[int]] = []
        decoding = threading.Thread(
            target=lambda: got.append(
                stream_ids(
                    decode_url,
                    body(name, PROMPTS[1], stream=True),
                    {"x-moefleet-kv-transfer": transfer, "x-moefleet-dp-rank": "1"},
                )
            )
        )
        decoding.start()
        target = f"127.0.0.1:{boot['kv_ports'][1]}"
        headers = {"x-moefleet-kv-transfer": transfer, "x-moefleet-kv-target": target}
        reply = httpx.post(
            prefill_url + "/v1/completions", json=body(name, PROMPTS[1]), headers=headers, timeout=120
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == expected[1][:1]  # the prefill side's first token
        decoding.join(120)
        assert got == [expected[1]]

        # The official openai client through the gateway.
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        extra = {"ignore_eos": True, "return_token_ids": True}
        completion = client.completions.create(
            model=name, prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, extra_body=extra
        )
        assert completion.choices[0].model_extra["token_ids"] == expected[0]
        chunks = client.completions.create(
            model=name, prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, stream=True, extra_body=extra
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text

        wait_until(lambda: kv_idle(prefill_url, decode_url), timeout=15, interval=0.2)
        # Every request went through the prefill group (it answers each transfer with its first token): 4
        # single, 8 concurrent, 1 by hand, 2 from the openai client.
        assert _finished(prefill_url) == 15

        # Clients that leave mid-stream free KV on both sides.
        leavers = [Stream(url, name, 400, prompt=PROMPTS[i % 2], leave_after=3).start() for i in range(4)]
        for stream in leavers:
            assert stream.join(60) and stream.left, stream
        freed_s = wait_until(lambda: kv_idle(prefill_url, decode_url), timeout=20, interval=0.1)

        # The decode group killed mid-stream: the client's stream ends with an error event, within seconds.
        victim = Stream(url, name, 800, prompt=PROMPTS[0]).start()
        assert victim.first_token.wait(60) and victim.tokens > 0
        children = groups.decode.children()
        killed = time.monotonic()
        os.kill(groups.decode.process.pid, signal.SIGKILL)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        assert victim.join(20), "the client hung after the decode group died"
        time_to_error = victim.ended - killed
        assert victim.finish_reason is None and victim.done, victim
        assert victim.error is not None, victim
        assert time_to_error < 10, time_to_error
        wait_until(lambda: kv_idle(prefill_url), timeout=15, interval=0.2)
    record(
        f"pd_groups_{name}",
        leavers_kv_freed_s=round(freed_s, 2),
        decode_killed_time_to_error_s=round(time_to_error, 2),
    )


def _finished(url: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("moefleet_requests_total{"))


def test_a_full_decode_rank_answers_503_kv_cache_full_through_the_group_exchange(tmp_path):
    """The "no room" refusal of a decode rank travels back to the front end as such (not as a 400), so the
    gateway can try another group: a 2-rank decode group with 2 KV blocks per rank (block size 16: one 19-token
    prompt + 8 new tokens), rank 1's held by a reservation whose KV never comes."""
    name = "qwen3_norm_topk"
    group = start_group(name, "decode", 2, tmp_path / "decode.log", ["--num-kv-blocks", "2"])
    try:
        group.wait_ready(timeout=300)
        url = group.base_url
        request = body(name, PROMPTS[1])

        def reserved() -> bool:
            return kv_gauges(url)["moefleet_num_requests_waiting_for_kv"] == 1

        with kv_reservation(url, request, reserved, headers={"x-moefleet-dp-rank": "1"}):
            headers = {"x-moefleet-kv-transfer": uuid.uuid4().hex, "x-moefleet-dp-rank": "1"}
            reply = httpx.post(url + "/v1/completions", json=request, headers=headers, timeout=60)
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "kv_cache_full"
            assert "no room" in reply.json()["error"]["message"]
        wait_until(lambda: kv_idle(url), timeout=15)
    finally:
        group.kill()
