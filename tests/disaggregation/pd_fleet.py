"""Disaggregated fleets for tests, plus the transformers oracle and request helpers:
- real processes: a `moefleet serve --role prefill` group and a `--role decode` group (each
  `--nproc-per-node N`, gloo on CPU), `pd_groups`;
- in this process: one role server (`PDEngineClient` + the engine's HTTP app under uvicorn), `role_server`;
- the gateway's disaggregated config over any number of groups per role, `pd_config`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from faults.conftest import ServeProcess
from support.asgi import serve_asgi
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


def pd_config(prefill_url: str | list[str], decode_url: str | list[str]) -> GatewayConfig:
    """Groups named p0, p1, ... and d0, d1, ... in the order given."""
    prefill = [prefill_url] if isinstance(prefill_url, str) else prefill_url
    decode = [decode_url] if isinstance(decode_url, str) else decode_url
    return GatewayConfig.from_dict(
        {
            "mode": "disaggregated",
            "roles": {
                "prefill": {"groups": [{"name": f"p{i}", "url": u} for i, u in enumerate(prefill)]},
                "decode": {"groups": [{"name": f"d{i}", "url": u} for i, u in enumerate(decode)]},
            },
        }
    )


@contextmanager
def role_server(
    name: str, role: str, block_size: int = 4, num_kv_blocks: int | None = None
) -> Iterator[tuple[str, Any]]:
    """A single-process `prefill` or `decode` engine server in this process: (its URL, its PDEngineClient)."""
    from moefleet.engine.config import EngineConfig
    from moefleet.engine.disaggregation.roles import PDEngineClient, make_router, pd_headers
    from moefleet.engine.llm_engine import LLMEngine
    from moefleet.engine.server.api import build_app

    config = EngineConfig(
        model=str(tiny_model_dir(name)),
        dtype="float32",
        max_model_len=256,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
    )
    client = PDEngineClient(LLMEngine(config), role, kv_host="127.0.0.1")
    app = pd_headers(build_app(client, name, [make_router(client)]))
    try:
        with serve_asgi(app) as url:
            yield url, client
    finally:
        client.shutdown()


def engines_idle(*clients: Any) -> bool:
    """No KV block used and no request parked for a transfer on any of these in-process engine clients."""
    for client in clients:
        stats = client.stats()
        if stats.get("kv_blocks_used") or stats.get("num_waiting_for_kv") or stats.get("num_sending_kv"):
            return False
    return True


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


def completion_ids(url: str, request: dict) -> list[int]:
    reply = httpx.post(url + "/v1/completions", json=request, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["token_ids"]


def check_greedy_through(url: str, name: str, expected: list[list[int]], concurrent: int = 8) -> None:
    """PROMPTS through the gateway at `url` equal `expected` (transformers greedy): each alone, not streamed
    and streamed, then `concurrent` at once (half streamed), which the gateway spreads over the decode ranks."""
    from concurrent.futures import ThreadPoolExecutor

    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert completion_ids(url, body(name, prompt)) == want
        assert stream_ids(url, body(name, prompt, stream=True)) == want

    def one(i: int) -> list[int]:
        prompt = PROMPTS[i % 2]
        if i % 4 < 2:
            return stream_ids(url, body(name, prompt, stream=True))
        return completion_ids(url, body(name, prompt))

    with ThreadPoolExecutor(concurrent) as pool:
        assert list(pool.map(one, range(concurrent))) == [expected[i % 2] for i in range(concurrent)]


@contextmanager
def kv_reservation(
    decode_url: str, request: dict, reserved: Any, headers: dict[str, str] | None = None
) -> Iterator[None]:
    """A transfer that never comes: the decode server reserves the prompt's KV and waits for it until this
    client leaves (a raw socket, so leaving is closing it). `reserved()` says when the reservation is held."""
    import socket
    import time
    from urllib.parse import urlsplit

    from server.conftest import wait_for

    payload = json.dumps(request).encode()
    parts = urlsplit(decode_url)
    sock = socket.create_connection((parts.hostname, parts.port))
    lines = [
        "POST /v1/completions HTTP/1.1",
        "Host: test",
        "Content-Type: application/json",
        f"x-moefleet-kv-transfer: hold-{time.monotonic_ns()}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
        f"Content-Length: {len(payload)}",
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    try:
        wait_for(reserved, timeout=30)
        yield
    finally:
        sock.close()
