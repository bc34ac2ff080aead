"""Logprobs in disaggregated mode: the prefill engine ships the first token's logprob entry (chosen + top-k) with
the KV, the decode engine emits it with the first token, so a request with `logprobs` is split (not served
whole by a decode group) and its answer equals a mixed engine's.

Real parts: a `prefill` and a `decode` engine server, the gateway in disaggregated mode, HTTP, the `tcp` KV
transfer (float32, CPU, a tiny model). Oracles: transformers greedy ids and transformers' log_softmax of its
logits (completions), and the same request served whole by an engine (the decode server without PD headers,
which serves as a mixed engine does), within 1e-4. The request went through prefill: the prefill engine
computed its prompt and the decode engine computed none.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from disaggregation.pd_fleet import (
    PROMPTS,
    body,
    engines_idle,
    hf_greedy,
    kv_idle,
    pd_config,
    pd_groups,
    role_server,
)
from gateway.conftest import serve_gateway
from server.conftest import wait_for
from support.tiny_models import one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

NAME = "qwen3_norm_topk"
TOP = 3
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


def _post(url: str, path: str, request: dict) -> dict[str, Any]:
    reply = httpx.post(url + path, json=request, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _events(url: str, path: str, request: dict) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", url + path, json=request, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                events.append(event)
    return events


def completion(url: str, request: dict) -> tuple[list[int], dict[str, list]]:
    """(token ids, the logprobs object) of a completion, streamed or not (a stream's pieces concatenated)."""
    if not request["stream"]:
        choice = _post(url, "/v1/completions", request)["choices"][0]
        return choice["token_ids"], choice["logprobs"]
    ids: list[int] = []
    logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in _events(url, "/v1/completions", request):
        choice = event["choices"][0]
        ids += choice.get("token_ids") or []
        for key, values in (choice.get("logprobs") or {}).items():
            logprobs[key] += values
    return ids, logprobs


def chat(url: str, request: dict) -> list[dict[str, Any]]:
    """The `logprobs.content` entries of a chat answer, streamed or not."""
    if not request["stream"]:
        return _post(url, "/v1/chat/completions", request)["choices"][0]["logprobs"]["content"]
    content: list[dict[str, Any]] = []
    for event in _events(url, "/v1/chat/completions", request):
        content += (event["choices"][0].get("logprobs") or {}).get("content") or []
    return content


def assert_close(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal JSON values, floats within TOL."""
    if isinstance(theirs, float) or isinstance(ours, float):
        assert ours == pytest.approx(theirs, abs=TOL), where
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), (where, ours, theirs)
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, (where, ours, theirs)


def hf_log_softmax(token_ids: list[int]) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(NAME), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float().log_softmax(dim=-1)


def test_logprobs_are_split_and_equal_a_mixed_engine():
    expected = hf_greedy(NAME, PROMPTS)
    messages = [{"role": "user", "content": "the KV moves, the logprobs follow"}]
    with (
        role_server(NAME, "prefill") as (prefill_url, prefill),
        role_server(NAME, "decode") as (decode_url, decode),
        serve_gateway(pd_config(prefill_url, decode_url)) as (url, _),
    ):
        before = prefill.stats()["prompt_tokens_total"], decode.stats()["prompt_tokens_total"]
        prompt_tokens = 0
        for stream in (False, True):
            for prompt, want in zip(PROMPTS, expected, strict=True):
                request = {**body(NAME, prompt, stream=stream), "logprobs": TOP}
                ids, logprobs = completion(url, request)
                assert ids == want
                assert len(logprobs["token_logprobs"]) == len(want)  # the first token's entry: once
                # The mixed engine's answer to the same request (the decode server serves it whole).
                mixed_ids, mixed = completion(decode_url, request)
                assert mixed_ids == want
                assert_close(logprobs, mixed, "completions")
                prompt_tokens += len(prompt)
        # Independent oracle: transformers' log_softmax at every generated position, the first included.
        prompt, want = PROMPTS[1], expected[1]
        ref = hf_log_softmax(prompt + want)
        _, logprobs = completion(url, {**body(NAME, prompt), "logprobs": TOP})
        prompt_tokens += len(prompt)
        for j, token in enumerate(want):
            row = ref[len(prompt) - 1 + j]
            assert logprobs["token_logprobs"][j] == pytest.approx(float(row[token]), abs=TOL)
            top = sorted(logprobs["top_logprobs"][j].values(), reverse=True)
            assert top[0] == pytest.approx(float(row.max()), abs=TOL)
            best = row.topk(TOP).values.tolist()
            assert all(any(abs(v - b) <= TOL for b in best) for v in top), (top, best)

        for stream in (False, True):
            request = {
                "model": NAME,
                "messages": messages,
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": True,
                "top_logprobs": TOP,
                "stream": stream,
            }
            content = chat(url, request)
            assert len(content) == 6 and all(len(entry["top_logprobs"]) == TOP for entry in content)
            assert_close(content, chat(decode_url, request), "chat")

        # Every gateway request went through prefill: the prefill engine computed its prompt and the decode
        # engine computed no prompt but those of the mixed-engine requests it was sent directly.
        gained_prefill = prefill.stats()["prompt_tokens_total"] - before[0]
        gained_decode = decode.stats()["prompt_tokens_total"] - before[1]
        mixed_prompts = sum(len(p) for p in PROMPTS) * 2
        assert gained_prefill > prompt_tokens  # the completions' prompts + the chat prompts
        chat_prompt = gained_prefill - prompt_tokens
        assert gained_decode == mixed_prompts + chat_prompt
        wait_for(lambda: engines_idle(prefill, decode), timeout=10)


def finished_requests(url: str) -> float:
    """The sum of an engine's `moefleet_requests_total` (finished requests, every finish reason)."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rpartition(" ")[2]) for line in lines if line.startswith("moefleet_requests_total"))


@pytest.mark.multiprocess
def test_two_rank_groups_split_logprobs_requests(tmp_path):
    """2-rank prefill and decode groups: concurrent logprobs requests (spread over the decode ranks) equal
    transformers greedy and the decode group's own whole answer, and each one was finished by the prefill group."""
    expected = hf_greedy(NAME, PROMPTS)
    with (
        pd_groups(NAME, tmp_path) as groups,
        serve_gateway(pd_config(groups.prefill.base_url, groups.decode.base_url)) as (url, _),
    ):
        prefill_url, decode_url = groups.prefill.base_url, groups.decode.base_url
        requests = [{**body(NAME, PROMPTS[i % 2], stream=i % 4 < 2), "logprobs": TOP} for i in range(8)]
        before = finished_requests(prefill_url)
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: completion(url, r), requests))
        assert finished_requests(prefill_url) - before == len(requests)
        for i, (request, (ids, logprobs)) in enumerate(zip(requests, answers, strict=True)):
            assert ids == expected[i % 2]
            whole_ids, whole = completion(decode_url, request)
            assert whole_ids == ids
            assert_close(logprobs, whole, f"request {i}")
        wait_for(lambda: kv_idle(prefill_url, decode_url), timeout=30)
