"""Prefill/decode disaggregation end to end: a `prefill` engine server, a `decode` engine server and the gateway
in disaggregated mode, over real HTTP and the real `tcp` KV transfer (float32, CPU, tiny models).

Oracle: transformers greedy generation. Also: streaming and not, the official openai client, KV usage back to
0 on both sides, a client that leaves mid-stream frees KV on both sides, and a decode server killed mid-stream
ends the client's stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from disaggregation.pd_fleet import (
    NEW_TOKENS,
    PROMPTS,
    body,
    engines_idle,
    hf_greedy,
    pd_config,
    role_server,
)
from gateway.conftest import scripted_backend, serve_gateway
from server.conftest import stream_last_event, wait_for
from support.asgi import serve_asgi
from support.controlplane import free_port
from support.tiny_models import one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


async def _stream_ids(url: str, request: dict) -> list[int]:
    ids: list[int] = []
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", url + "/v1/completions", json=request) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line.removeprefix("data: "))
                    assert "error" not in event, event
                    ids.extend(event["choices"][0].get("token_ids") or [])
    return ids


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_prefill_decode_through_the_gateway_match_transformers(name):
    expected = hf_greedy(name, PROMPTS)
    with (
        role_server(name, "prefill") as (prefill_url, prefill),
        role_server(name, "decode") as (decode_url, decode),
        serve_gateway(pd_config(prefill_url, decode_url)) as (url, _),
    ):
        for prompt, want in zip(PROMPTS, expected, strict=True):
            reply = httpx.post(url + "/v1/completions", json=body(name, prompt), timeout=120)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["token_ids"] == want
        streamed = asyncio.run(_stream_ids(url, body(name, PROMPTS[1], stream=True)))
        assert streamed == expected[1]

        async def concurrent() -> list[list[int]]:
            return await asyncio.gather(*(_stream_ids(url, body(name, p, stream=True)) for p in PROMPTS * 2))

        assert asyncio.run(concurrent()) == expected * 2
        wait_for(lambda: engines_idle(prefill, decode), timeout=10)
        # The prefill group computed every prompt; the decode group computed none of them.
        assert prefill.stats()["prompt_tokens_total"] == 3 * sum(map(len, PROMPTS)) + len(PROMPTS[1])
        assert decode.stats()["prompt_tokens_total"] == 0
        metrics = httpx.get(url + "/metrics").text
        assert "moefleet_gateway_kv_transfer_seconds_count 7.0" in metrics
        engine_metrics = httpx.get(decode_url + "/metrics").text + httpx.get(prefill_url + "/metrics").text
        assert engine_metrics.count("moefleet_num_requests_waiting_for_kv 0.0") == 2
        assert engine_metrics.count("moefleet_num_requests_sending_kv 0.0") == 2
        # What moves per token and layer: an MLA model's compressed latent + roped key only, else K and V.
        hf = json.loads((tiny_model_dir(name) / "config.json").read_text())
        layout = httpx.get(decode_url + "/v1/pd/bootstrap").json()["kv_layout"]
        if "kv_lora_rank" in hf:
            per_token = [hf["kv_lora_rank"] + hf["qk_rope_head_dim"]]
        else:
            per_token = [2, hf["num_key_value_heads"], hf["head_dim"]]
        assert len(layout["block_shapes"]) == hf["num_hidden_layers"]
        for shape in layout["block_shapes"]:
            assert math.prod(shape) == 4 * math.prod(per_token)  # block_size 4

        # The official openai client, chat included; a chat answer equals the decode server's own (mixed) one.
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        direct = openai.OpenAI(base_url=decode_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = {
            "model": name,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 6,
            "temperature": 0,
        }
        assert (
            client.chat.completions.create(**chat).choices[0].message.content
            == direct.chat.completions.create(**chat).choices[0].message.content
        )
        deltas = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**chat, stream=True)
            if c.choices
        ]
        assert "".join(deltas) == direct.chat.completions.create(**chat).choices[0].message.content
        wait_for(lambda: engines_idle(prefill, decode), timeout=10)


def test_a_client_that_leaves_mid_stream_frees_kv_on_both_sides():
    name = "qwen3_norm_topk"
    with (
        role_server(name, "prefill") as (prefill_url, prefill),
        role_server(name, "decode") as (decode_url, decode),
        serve_gateway(pd_config(prefill_url, decode_url)) as (url, _),
    ):

        async def leave() -> list[str | None]:
            bodies = [body(name, p, stream=True, max_tokens=200) for p in PROMPTS * 2]
            return await asyncio.gather(*(stream_last_event(url, b, 3, timeout=60) for b in bodies))

        assert asyncio.run(leave()) == [None] * 4
        wait_for(lambda: engines_idle(prefill, decode), timeout=15)
        # Still serving correctly afterwards.
        reply = httpx.post(url + "/v1/completions", json=body(name, PROMPTS[0]), timeout=60)
        assert reply.status_code == 200 and len(reply.json()["choices"][0]["token_ids"]) == NEW_TOKENS
        wait_for(lambda: engines_idle(prefill, decode), timeout=10)


def test_killing_the_decode_server_mid_stream_ends_the_stream_with_an_error():
    name = "qwen3_norm_topk"
    port = free_port()
    env = {**os.environ, "MOEFLEET_ROLE": "decode"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moefleet.engine.cli",
            "serve",
            "--model",
            str(tiny_model_dir(name)),
            "--port",
            str(port),
            "--max-model-len",
            "1024",
            "--served-model-name",
            name,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    decode_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(decode_url + "/health"), timeout=120, interval=0.2)
        assert httpx.get(decode_url + "/v1/pd/bootstrap").json()["role"] == "decode"
        with (
            # The block size `moefleet serve` uses by default (prefill and decode layouts must match).
            role_server(name, "prefill", block_size=16) as (prefill_url, prefill),
            serve_gateway(pd_config(prefill_url, decode_url)) as (url, _),
        ):
            request = body(name, PROMPTS[0], stream=True, max_tokens=240)
            started = None
            events: list[str] = []
            with httpx.stream("POST", url + "/v1/completions", json=request, timeout=60) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line)
                    if len(events) == 3:
                        process.kill()
                        started = time.monotonic()
            assert started is not None, (response.status_code, events)
            assert time.monotonic() - started < 15
            assert "error" in json.loads(events[-2].removeprefix("data: ")) and events[-1] == "data: [DONE]"
            wait_for(lambda: engines_idle(prefill), timeout=10)
    finally:
        process.kill()
        process.wait()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_prefill_group_frees_the_decode_reservation_and_the_decode_group_serves_it_whole(stream):
    """The only prefill group answers 503 before the first token: the decode reservation is cancelled (KV back
    to 0) and, with no other prefill group to try, the decode group computes the prompt itself."""
    name = "qwen3_norm_topk"
    expected = hf_greedy(name, PROMPTS[1:])[0]
    app, state = scripted_backend("draining")  # healthy, but answers every completion 503
    with (
        serve_asgi(app) as prefill_url,
        role_server(name, "decode") as (decode_url, decode),
        serve_gateway(pd_config(prefill_url, decode_url)) as (url, _),
    ):
        request = body(name, PROMPTS[1], stream=stream)
        if stream:
            assert asyncio.run(_stream_ids(url, request)) == expected
        else:
            reply = httpx.post(url + "/v1/completions", json=request, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["token_ids"] == expected
        assert state["requests"] == 1
        assert decode.stats()["prompt_tokens_total"] == len(PROMPTS[1])  # served whole: computed there
        assert 'moefleet_gateway_retries_total{role="prefill"} 1.0' in httpx.get(url + "/metrics").text
        wait_for(lambda: engines_idle(decode), timeout=10)


def test_the_commands_serve_pd_on_one_host_with_no_flags_beyond_role():
    """`moefleet serve --role prefill`, `moefleet serve --role decode` and `moefleet gateway --prefill --decode`
    as processes: the KV receiver port is announced, nothing else is configured."""
    name = "qwen3_norm_topk"
    ports = {"prefill": free_port(), "decode": free_port(), "gateway": free_port()}
    moefleet = [sys.executable, "-c", "import sys; from moefleet.engine.cli import main; sys.exit(main())"]
    processes = [
        subprocess.Popen(
            [
                *moefleet,
                "serve",
                "--model",
                str(tiny_model_dir(name)),
                "--served-model-name",
                name,
                "--port",
                str(ports[role]),
                "--max-model-len",
                "256",
                "--role",
                role,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role in ("prefill", "decode")
    ]
    processes.append(
        subprocess.Popen(
            [
                *moefleet,
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["gateway"]),
                "--prefill",
                f"http://127.0.0.1:{ports['prefill']}",
                "--decode",
                f"http://127.0.0.1:{ports['decode']}",
                "--poll-interval",
                "0.2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    url = f"http://127.0.0.1:{ports['gateway']}"
    try:
        for port in ports.values():
            wait_for(lambda port=port: _ok(f"http://127.0.0.1:{port}/health"), timeout=240, interval=0.2)
        expected = hf_greedy(name, PROMPTS[:1])[0]
        reply = httpx.post(url + "/v1/completions", json=body(name, PROMPTS[0]), timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == expected
        assert "moefleet_gateway_kv_transfer_seconds_count 1.0" in httpx.get(url + "/metrics").text
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
