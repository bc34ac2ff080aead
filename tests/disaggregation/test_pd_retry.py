"""Disaggregated requests are retried on another group before their first token (real engines on CPU, real
HTTP, the real `tcp` KV transfer, the gateway in disaggregated mode; oracle: transformers greedy):
- a decode group whose KV cache is full answers 503 `kv_cache_full`; the gateway takes the next decode group,
  and when every decode group is full the client gets 503 (OpenAI error, Retry-After) at once, never a hang;
- a decode group that died since the last health poll is skipped (and leaves the pool);
- a prefill group that fails (503) or cannot be reached before the first token is skipped for another one;
KV usage is back to 0 on every engine afterwards (the attempts that failed were aborted on both sides).

The gateway polls rarely here (`POLL_S`), so every group looks equally idle and healthy to it, and the first
group of each role by name (p0, d0) is always tried first: the failing one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import openai
import pytest
from disaggregation.pd_fleet import (
    PROMPTS,
    body,
    completion_ids,
    engines_idle,
    hf_greedy,
    kv_reservation,
    pd_config,
    role_server,
    stream_ids,
)
from gateway.conftest import scripted_backend
from moefleet.engine.gateway.app import Gateway, build_gateway_app
from moefleet.engine.gateway.pool import BackendPool
from server.conftest import wait_for
from support.asgi import serve_asgi
from support.controlplane import free_port
from support.tiny_models import one_torch_thread

from moefleet.gateway_schema import GatewayConfig

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

NAME = "qwen3_norm_topk"
POLL_S = 600.0
# Block size 4: a 19-token prompt (PROMPTS[1]) takes 5 blocks; 8 blocks hold one such reservation, not two.
SMALL_CACHE_BLOCKS = 8


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return hf_greedy(NAME, PROMPTS[1:])[0]


@contextmanager
def pd_gateway(config: GatewayConfig) -> Iterator[tuple[str, Gateway]]:
    gateway = Gateway(BackendPool(config, poll_interval=POLL_S))
    with serve_asgi(build_gateway_app(gateway)) as url:
        yield url, gateway


@contextmanager
def held(decode_url: str, decode) -> Iterator[None]:
    """A 19-token prompt's KV reserved on `decode` for a transfer that never comes, until the block ends."""
    waiting = decode.stats()["num_waiting_for_kv"]
    request = body(NAME, PROMPTS[1])
    with kv_reservation(decode_url, request, lambda: decode.stats()["num_waiting_for_kv"] == waiting + 1):
        yield


def retries(url: str, role: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'moefleet_gateway_retries_total{{role="{role}"}}'):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_a_full_decode_group_is_skipped_and_all_full_answers_503_with_retry_after(expected):
    with (
        role_server(NAME, "prefill") as (prefill_url, prefill),
        role_server(NAME, "decode", num_kv_blocks=SMALL_CACHE_BLOCKS) as (d0_url, d0),
        role_server(NAME, "decode", num_kv_blocks=SMALL_CACHE_BLOCKS) as (d1_url, d1),
        pd_gateway(pd_config(prefill_url, [d0_url, d1_url])) as (url, gateway),
    ):
        # A decode server with no room answers 503 kv_cache_full (a valid request: not 400).
        with held(d0_url, d0):
            direct = httpx.post(
                d0_url + "/v1/completions",
                json=body(NAME, PROMPTS[1]),
                headers={"x-moefleet-kv-transfer": "direct"},
                timeout=30,
            )
            assert direct.status_code == 503, direct.text
            assert direct.json()["error"]["code"] == "kv_cache_full"

            # Through the gateway: d0 (tried first) is full, d1 serves it, prompt computed by the prefill group.
            assert completion_ids(url, body(NAME, PROMPTS[1])) == expected
            assert stream_ids(url, body(NAME, PROMPTS[1], stream=True)) == expected
            assert retries(url, "decode") == 2.0
            assert d0.stats()["prompt_tokens_total"] == d1.stats()["prompt_tokens_total"] == 0
            assert gateway.pool.backends["d0"].healthy  # full is not down

            # Every decode group full: 503 in OpenAI form with Retry-After, within the bound (no waiting).
            with held(d1_url, d1):
                started = time.monotonic()
                reply = httpx.post(url + "/v1/completions", json=body(NAME, PROMPTS[1]), timeout=30)
                assert time.monotonic() - started < 10
                assert reply.status_code == 503, reply.text
                assert reply.headers["retry-after"] == "1"
                error = reply.json()["error"]
                assert error["code"] == "kv_cache_full" and error["type"] == "service_unavailable_error"
                assert (
                    "retry in 1 s" in error["message"]
                    and "d0" in error["message"]
                    and "d1" in error["message"]
                )
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
                with pytest.raises(openai.APIStatusError) as raised:
                    client.completions.create(
                        model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True
                    )
                assert raised.value.status_code == 503
        # Reservations released, refused attempts aborted: nothing held anywhere.
        wait_for(lambda: engines_idle(prefill, d0, d1), timeout=15)
        assert completion_ids(url, body(NAME, PROMPTS[1])) == expected
        wait_for(lambda: engines_idle(prefill, d0, d1), timeout=15)


def test_a_decode_group_that_died_since_the_last_poll_is_skipped(expected):
    with ExitStack() as stack:
        prefill_url, prefill = stack.enter_context(role_server(NAME, "prefill"))
        d1_url, d1 = stack.enter_context(role_server(NAME, "decode"))
        d0_stack = stack.enter_context(ExitStack())
        d0_url, d0 = d0_stack.enter_context(role_server(NAME, "decode"))
        url, gateway = stack.enter_context(pd_gateway(pd_config(prefill_url, [d0_url, d1_url])))
        assert completion_ids(url, body(NAME, PROMPTS[1])) == expected  # d0 serves it (read its bootstrap)
        assert retries(url, "decode") == 0.0
        d0_stack.close()  # d0 dies; the gateway has not polled since
        assert gateway.pool.backends["d0"].healthy
        assert stream_ids(url, body(NAME, PROMPTS[1], stream=True)) == expected
        assert retries(url, "decode") == 1.0
        assert not gateway.pool.backends["d0"].healthy  # left the pool
        assert d1.stats()["prompt_tokens_total"] == 0  # KV from the prefill group, not served whole
        wait_for(lambda: engines_idle(prefill, d1), timeout=15)


@pytest.mark.parametrize("failure", ["answers 503", "unreachable"])
def test_a_prefill_group_that_fails_before_the_first_token_is_skipped(expected, failure):
    app, state = scripted_backend("draining")
    with ExitStack() as stack:
        if failure == "answers 503":
            p0_url = stack.enter_context(serve_asgi(app))
        else:
            p0_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        p1_url, p1 = stack.enter_context(role_server(NAME, "prefill"))
        decode_url, decode = stack.enter_context(role_server(NAME, "decode"))
        url, gateway = stack.enter_context(pd_gateway(pd_config([p0_url, p1_url], decode_url)))
        gateway.pool.backends["p0"].healthy = True  # as if it had passed its last poll
        assert completion_ids(url, body(NAME, PROMPTS[1])) == expected
        gateway.pool.backends["p0"].healthy = True
        assert stream_ids(url, body(NAME, PROMPTS[1], stream=True)) == expected
        assert retries(url, "prefill") == 2.0
        if failure == "answers 503":
            assert state["requests"] == 2
        # Both prompts computed by p1 and moved to the decode group, whose reservations of the failed
        # attempts were freed.
        assert p1.stats()["prompt_tokens_total"] == 2 * len(PROMPTS[1])
        assert decode.stats()["prompt_tokens_total"] == 0
        wait_for(lambda: engines_idle(p1, decode), timeout=15)


def test_no_decode_group_left_answers_503_naming_what_was_tried():
    """Every decode group refused (here: draining engines answering 503): 503 with Retry-After, and the
    prefill legs started for them were cancelled (the prefill engine holds nothing)."""
    with ExitStack() as stack:
        prefill_url, prefill = stack.enter_context(role_server(NAME, "prefill"))
        decode_url, decode = stack.enter_context(role_server(NAME, "decode"))
        # A decode group with roles whose completions answer 503 (draining): its bootstrap is a real one.
        app, state = scripted_backend("draining")
        boot = httpx.get(decode_url + "/v1/pd/bootstrap").json()

        @app.get("/v1/pd/bootstrap")
        async def bootstrap() -> dict:
            return boot

        draining_url = stack.enter_context(serve_asgi(app))
        url, gateway = stack.enter_context(pd_gateway(pd_config(prefill_url, [draining_url, decode_url])))
        gateway.pool.backends["d1"].healthy = False  # only the draining group is eligible
        reply = httpx.post(url + "/v1/completions", json=body(NAME, PROMPTS[1]), timeout=30)
        assert reply.status_code == 503, reply.text
        assert reply.headers["retry-after"] == "1"
        error = reply.json()["error"]
        assert "decode group d0: answered 503" in error["message"] and "retry in 1 s" in error["message"]
        assert state["requests"] == 1
        wait_for(lambda: engines_idle(prefill, decode), timeout=15)
