"""A disaggregated fleet of real processes for tests: a `moefleet serve --role prefill` group and a
`--role decode` group (each `--nproc-per-node N`, gloo on CPU) behind the gateway, plus the transformers oracle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from faults.conftest import ServeProcess
from support.reference import free_port
from support.tiny_models import tiny_model_dir

from moefleet.gateway_schema import GatewayConfig

PROMPTS = [[5, 17, 230, 99, 4], [300, 12, 41, 7, 8, 9, 10, 11, 77, 3, 1, 2, 250, 19, 20, 21, 22, 23, 24]]
NEW_TOKENS = 8


def start_group(name: str, role: str, ranks: int, log: Path, extra: list[str] = ()) -> ServeProcess:
    args = ["--nproc-per-node", str(ranks), "--master-port", str(free_port()), "--role", role]
    args += ["--served-model-name", name, *extra]
    return ServeProcess(tiny_model_dir(name), log, args)


@dataclass
class Groups:
    prefill: ServeProcess
    decode: ServeProcess


@contextmanager
def pd_groups(name: str, tmp_path: Path, ranks: int = 2, extra: list[str] = ()) -> Iterator[Groups]:
    """Both groups, started together and ready (their logs in tmp_path); killed (children too) on exit."""
    with ExitStack() as stack:
        groups = {}
        for role in ("prefill", "decode"):
            group = start_group(name, role, ranks, tmp_path / f"{role}.log", list(extra))
            stack.callback(group.kill)
            groups[role] = group
        for group in groups.values():
            group.wait_ready(timeout=300)
        yield Groups(groups["prefill"], groups["decode"])


def pd_config(prefill_url: str, decode_url: str) -> GatewayConfig:
    return GatewayConfig.from_dict(
        {
            "mode": "disaggregated",
            "roles": {
                "prefill": {"groups": [{"name": "p0", "url": prefill_url}]},
                "decode": {"groups": [{"name": "d0", "url": decode_url}]},
            },
        }
    )


def hf_greedy(name: str, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    import transformers

    model_dir = tiny_model_dir(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
            )
        out.append(gen[0, len(prompt) :].tolist())
    return out


def body(name: str, prompt: list[int], stream: bool = False, max_tokens: int = NEW_TOKENS) -> dict:
    return {
        "model": name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


def kv_gauges(url: str) -> dict[str, float]:
    """The group-wide KV gauges of an engine's /metrics."""
    wanted = {
        "moefleet_kv_cache_usage_ratio",
        "moefleet_num_requests_running",
        "moefleet_num_requests_waiting",
        "moefleet_num_requests_waiting_for_kv",
        "moefleet_num_requests_sending_kv",
    }
    found = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        metric, _, value = line.partition(" ")
        if metric in wanted:
            found[metric] = float(value)
    assert set(found) == wanted, found
    return found


def kv_idle(*urls: str) -> bool:
    return all(not any(kv_gauges(url).values()) for url in urls)


def stream_ids(url: str, request: dict, headers: dict | None = None) -> list[int]:
    ids: list[int] = []
    with httpx.stream(
        "POST", url + "/v1/completions", json=request, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                ids.extend(event["choices"][0].get("token_ids") or [])
    return ids
