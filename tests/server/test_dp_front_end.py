"""The HTTP server over the data-parallel front end (DPFrontEndClient: DPEngineLoop + RequestRouter), one rank
in-process.

Same answers as the local engine client; disconnects abort through the router; shutdown stops the loop.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from moefleet.engine.config import EngineConfig
from moefleet.engine.distributed.engine_glue import DPEngineLoop
from moefleet.engine.distributed.request_router import RequestRouter
from moefleet.engine.entrypoints.dp_client import DPFrontEndClient
from moefleet.engine.llm_engine import LLMEngine
from moefleet.engine.server.async_engine import LocalEngineClient
from server.conftest import serve_app, wait_for
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

NAME = "deepseek_grouped"
PROMPTS = [[5, 9, 300, 41], list(range(10, 40)), [7] * 12]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():  # tiny matmuls on a shared 2-core machine: extra intra-op threads only contend
        yield


def _engine() -> LLMEngine:
    config = EngineConfig(
        model=str(tiny_model_dir(NAME)),
        dtype="float32",
        max_model_len=128,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    return LLMEngine(config)


async def _greedy_all(base_url: str) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=60) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    base_url + "/v1/completions",
                    json={
                        "model": NAME,
                        "prompt": prompt,
                        "max_tokens": 8,
                        "temperature": 0,
                        "ignore_eos": True,
                        "return_token_ids": True,
                    },
                )
                for prompt in PROMPTS
            )
        )
    return [r.json()["choices"][0]["token_ids"] for r in responses]


def test_dp_front_end_serves_like_the_local_client():
    with serve_app(LocalEngineClient(_engine()), served_model_name=NAME) as local:
        expected = asyncio.run(_greedy_all(local.base_url))

    loop = DPEngineLoop(_engine(), RequestRouter(None), idle_wait_s=0.01)
    client = DPFrontEndClient(loop)
    with serve_app(client, served_model_name=NAME) as server:
        assert asyncio.run(_greedy_all(server.base_url)) == expected
        # A client that leaves mid-stream is aborted through the router; the KV cache drains.
        body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 90, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break
        wait_for(lambda: server.metric("moefleet_requests_total", 'finish_reason="abort"') == 1)
        wait_for(lambda: server.metric("moefleet_kv_cache_blocks_used") == 0)
        assert server.metric("moefleet_requests_total", 'finish_reason="length"') == len(PROMPTS)
    assert client._thread is None and client.dead_error is None  # shutdown left the loop cleanly
