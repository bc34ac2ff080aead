"""Acceptance over HTTP with the real engine and the named tiny models (float32, CPU).

- Greedy completions with token-id prompts equal transformers `generate(do_sample=False)` token for token,
  one request alone and 8 concurrent requests of different lengths (small token budget: chunked prefill).
- 50 concurrent streams, a third of whose clients leave early: the server stays healthy, later requests
  are still correct, and the KV cache is empty again (read from /metrics).
"""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest
import torch
from moefleet.engine.config import EngineConfig
from moefleet.engine.llm_engine import LLMEngine
from moefleet.engine.server.async_engine import LocalEngineClient
from server.conftest import serve_app, stream_last_event, wait_for
from support.tiny_models import TINY_CONFIGS, one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

NEW_TOKENS = 10
PROMPT_LENGTHS = [3, 40, 7, 25, 1, 33, 12, 18]  # up to 40 tokens: several 16-token prefill chunks


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():  # tiny matmuls on a shared 2-core machine: extra intra-op threads only contend
        yield


def start_server(name: str, **config):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model_dir(name)), dtype="float32", max_model_len=256, **config)
    )
    return serve_app(LocalEngineClient(engine), served_model_name=name)


def hf_greedy(name: str, prompts: list[list[int]]) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(name), dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,  # compare full-length outputs; the server request sets ignore_eos
            )
        expected.append(out[0, len(prompt) :].tolist())
    assert all(len(tokens) == NEW_TOKENS for tokens in expected)
    return expected


async def complete_ids(base_url: str, name: str, prompt: list[int]) -> dict:
    body = {
        "model": name,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    async with httpx.AsyncClient(timeout=120) as http:
        response = await http.post(base_url + "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_completions_over_http_match_transformers(name):
    vocab_size = 600  # below every tiny tokenizer's size; skip the first ids (special tokens)
    rng = random.Random(name)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]
    expected = hf_greedy(name, prompts)
    with start_server(name, max_num_batched_tokens=16, max_num_seqs=8) as server:
        single = asyncio.run(complete_ids(server.base_url, name, prompts[1]))
        assert single["choices"][0]["token_ids"] == expected[1]
        assert single["choices"][0]["finish_reason"] == "length"
        assert single["usage"] == {"prompt_tokens": 40, "completion_tokens": NEW_TOKENS, "total_tokens": 50}

        async def together() -> list[dict]:
            return await asyncio.gather(*(complete_ids(server.base_url, name, p) for p in prompts))

        results = asyncio.run(together())
        assert [r["choices"][0]["token_ids"] for r in results] == expected
        assert server.metric("moefleet_kv_cache_blocks_used") == 0
        assert server.metric("moefleet_requests_total", 'finish_reason="length"') == 1 + len(prompts)


def test_greedy_chat_over_http_matches_transformers_chat_template():
    """Chat: the prompt is the model's chat template as transformers renders it, and the reply is
    transformers' greedy continuation of it (as text)."""
    name = "qwen3_norm_topk"
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Italy?"}],
        },
    ]
    hf_messages = [
        {**m, "content": m["content"] if isinstance(m["content"], str) else "And of Italy?"} for m in messages
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir(name))
    prompt = tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    expected_text = tokenizer.decode(hf_greedy(name, [prompt])[0], skip_special_tokens=True)
    with start_server(name) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=name,
            messages=messages,
            max_completion_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == NEW_TOKENS
    assert expected_text.strip() and reply.choices[0].message.content == expected_text


async def _stream(base_url: str, name: str, index: int, leave_after: int | None) -> str | None:
    body = {
        "model": name,
        "prompt": "Once upon a time " * (1 + index % 5),
        # Leavers ask for far more than they wait for: only an abort (not the end) can stop them.
        "max_tokens": 24 if leave_after is None else 200,
        "temperature": 0.8,
        "seed": index,
        "ignore_eos": True,
        "stream": True,
    }
    return await stream_last_event(base_url, body, leave_after, timeout=120)


def test_fifty_streams_with_disconnects_leave_server_healthy():
    name = "qwen3_norm_topk"
    with start_server(name, max_num_batched_tokens=128, max_num_seqs=16) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def greedy_chat() -> str:
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=12,
                temperature=0,
            )
            return reply.choices[0].message.content or ""

        def seeded() -> str:
            reply = client.completions.create(
                model=name, prompt="The weather today", max_tokens=12, temperature=1.0, seed=7
            )
            return reply.choices[0].text

        before, seeded_before = greedy_chat(), seeded()

        async def storm() -> list[str | None]:
            return await asyncio.gather(
                *(_stream(server.base_url, name, i, 2 if i % 3 == 0 else None) for i in range(50))
            )

        results = asyncio.run(storm())
        leavers = sum(1 for i in range(50) if i % 3 == 0)
        assert results.count("data: [DONE]") == 50 - leavers
        wait_for(lambda: server.metric("moefleet_requests_total", 'finish_reason="abort"') == leavers)
        wait_for(lambda: server.metric("moefleet_kv_cache_blocks_used") == 0)
        assert server.metric("moefleet_kv_cache_usage_ratio") == 0
        assert server.metric("moefleet_num_requests_running") == 0
        assert server.metric("moefleet_num_requests_waiting") == 0
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        assert greedy_chat() == before
        assert seeded() == seeded_before  # same seed, same tokens, whatever ran before
        assert server.metric("moefleet_requests_total", 'finish_reason="length"') >= 50 - leavers
        assert server.metric("moefleet_time_to_first_token_seconds_count") >= 50
