"""The gateway over real HTTP: the official openai client in front, real engine servers behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from gateway.conftest import POLL_INTERVAL, scripted_backend, serve_gateway
from moefleet.engine.gateway import command as gateway_command
from server.conftest import serve_fake_engine, stream_last_event, wait_for
from support.asgi import serve_asgi
from support.controlplane import free_port

from moefleet.gateway_schema import GatewayConfig, mixed_config

pytestmark = pytest.mark.timeout(600)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _served(server) -> float:
    return sum(
        server.metric("moefleet_requests_total", f'finish_reason="{reason}"') for reason in ("stop", "length")
    )


def test_openai_client_through_the_gateway_matches_a_direct_call_and_spreads_load():
    with (
        serve_fake_engine(step_delay=0.01) as one,
        serve_fake_engine(step_delay=0.01) as two,
        serve_gateway([one.base_url, two.base_url]) as (url, _),
    ):
        through, direct = _client(url), _client(one.base_url)
        args = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}
        assert (
            through.completions.create(**args).choices[0].text
            == direct.completions.create(**args).choices[0].text
        )
        streamed = "".join(c.choices[0].text for c in through.completions.create(**args, stream=True))
        assert streamed == direct.completions.create(**args).choices[0].text
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        reply = through.chat.completions.create(**chat)
        assert (
            reply.choices[0].message.content
            == direct.chat.completions.create(**chat).choices[0].message.content
        )
        deltas = [
            c.choices[0].delta.content or ""
            for c in through.chat.completions.create(**chat, stream=True)
            if c.choices
        ]
        assert "".join(deltas) == reply.choices[0].message.content
        assert through.models.list().data[0].id == "tiny"

        async def burst() -> list[str | None]:
            body = {"model": "tiny", "prompt": "spread", "max_tokens": 30, "stream": True}
            return await asyncio.gather(*(stream_last_event(url, body, None, timeout=30) for _ in range(12)))

        assert all(last == "data: [DONE]" for last in asyncio.run(burst()))
        # Least-load routing over concurrent streams: both groups served part of the burst.
        assert _served(one) >= 3 and _served(two) >= 3
        metrics = httpx.get(url + "/metrics").text
        assert 'moefleet_gateway_requests_total{code="200",role="mixed"}' in metrics
        assert 'moefleet_gateway_backends{role="mixed",state="ready"} 2.0' in metrics


def test_a_draining_backend_is_skipped_before_the_first_byte():
    app, state = scripted_backend("draining")
    with (
        serve_asgi(app) as draining,
        serve_fake_engine() as live,
        serve_gateway([draining, live.base_url]) as (url, _),
    ):
        # backend-0 (draining) wins the tie of two idle backends, answers 503, and the gateway retries backend-1.
        reply = _client(url).completions.create(model="tiny", prompt="x", max_tokens=3)
        assert reply.choices[0].finish_reason == "length"
        assert state["requests"] == 1
        assert 'moefleet_gateway_retries_total{role="mixed"} 1.0' in httpx.get(url + "/metrics").text


def test_no_backend_answers_503_in_openai_shape_and_health_says_why():
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_gateway([dead]) as (url, _):
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "no ready group" in health.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as info:
            _client(url).completions.create(model="tiny", prompt="x", max_tokens=3)
        assert info.value.status_code == 503
        assert "no healthy mixed group" in info.value.body["message"]  # type: ignore[index]
        bad = httpx.post(
            url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("script", ["break", "hang"])
def test_a_backend_failing_mid_stream_ends_the_stream_with_an_error_event(script):
    app, state = scripted_backend(script)
    with serve_asgi(app) as backend, serve_gateway([backend]) as (url, gateway):
        started = time.monotonic()
        if script == "hang":
            # The group stops answering health checks while the stream is open.
            threading.Timer(0.5, lambda: state.update(healthy=False)).start()
        with httpx.stream(
            "POST", url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}, timeout=30
        ) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - started
        assert events[0].startswith('data: {"choices"')
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert "failed mid-stream" in error["message"] and events[-1] == "data: [DONE]"
        assert elapsed < 15.0, f"the client waited {elapsed:.1f} s for the error"
        assert gateway.pool.backends["backend-0"].in_flight == 0


def test_client_disconnects_through_the_gateway_abort_requests_upstream():
    with (
        serve_fake_engine(max_model_len=2048, step_delay=0.005) as engine_server,
        serve_gateway([engine_server.base_url]) as (url, gateway),
    ):

        async def scenario() -> list[str | None]:
            def body(i: int) -> dict:
                return {
                    "model": "tiny",
                    "prompt": "a" * (1 + i),
                    "max_tokens": 1000 if i % 2 else 20,
                    "stream": True,
                }

            return await asyncio.gather(
                *(stream_last_event(url, body(i), 3 if i % 2 else None, timeout=30) for i in range(8))
            )

        results = asyncio.run(scenario())
        assert sum(r == "data: [DONE]" for r in results) == 4
        engine = engine_server.engine  # type: ignore[attr-defined]
        wait_for(lambda: len(engine.aborted) == 4, timeout=10)
        wait_for(lambda: engine_server.metric("moefleet_kv_cache_blocks_used") == 0, timeout=10)
        wait_for(lambda: gateway.pool.backends["backend-0"].in_flight == 0, timeout=10)


def test_config_file_changes_are_applied_without_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway_command, "CONFIG_CHECK_SECONDS", 0.1)
    with serve_fake_engine() as first, serve_fake_engine() as second:
        path = tmp_path / "config.json"
        path.write_text(mixed_config([first.base_url]).to_json())
        with serve_gateway(GatewayConfig.load(path), watch=str(path)) as (url, gateway):
            client = _client(url)
            client.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert _served(first) == 1 and _served(second) == 0
            path.write_text("{broken")  # a bad write keeps the old config
            time.sleep(0.4)
            client.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert _served(first) == 2
            data = json.loads(mixed_config([second.base_url]).to_json())
            data["roles"]["mixed"]["groups"][0]["name"] = "new-group"
            path.write_text(json.dumps(data))
            wait_for(lambda: list(gateway.pool.backends) == ["new-group"], timeout=5)
            wait_for(lambda: gateway.pool.backends["new-group"].healthy, timeout=5)
            client.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert _served(second) == 1 and _served(first) == 2


def test_disaggregated_config_serves_whole_requests_through_decode_groups_without_roles():
    # Engines without --role answer 404 on /v1/pd/bootstrap: requests are not split (tests/disaggregation splits).
    with serve_fake_engine() as prefill, serve_fake_engine() as decode:
        config = GatewayConfig.from_dict(
            {
                "mode": "disaggregated",
                "roles": {
                    "prefill": {"groups": [{"name": "p0", "url": prefill.base_url}]},
                    "decode": {"groups": [{"name": "d0", "url": decode.base_url}]},
                },
            }
        )
        with serve_gateway(config) as (url, _):
            assert httpx.get(url + "/health").json()["ready_groups"] == {"decode": 1}
            _client(url).completions.create(model="tiny", prompt="a", max_tokens=2)
            assert _served(decode) == 1 and _served(prefill) == 0


def test_the_gateway_command_serves_and_refuses_bad_flags(tmp_path):
    def moefleet(*args: str, **kw):
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from moefleet.engine.cli import main; sys.exit(main())",
                "gateway",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kw,
        )

    refused = moefleet()
    out, _ = refused.communicate(timeout=240)
    assert refused.returncode == 2 and "give exactly one of --config FILE" in out
    (tmp_path / "c.json").write_text(json.dumps({"roles": {"mixed": {"groups": [{"url": "nope"}]}}}))
    refused = moefleet("--config", str(tmp_path / "c.json"))
    out, _ = refused.communicate(timeout=240)
    assert refused.returncode == 2 and "roles.mixed.groups[0].url" in out
    with serve_fake_engine() as backend:
        port = free_port()
        process = moefleet(
            "--backend",
            backend.base_url,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--poll-interval",
            str(POLL_INTERVAL),
        )
        try:
            wait_for(lambda: _ready(f"http://127.0.0.1:{port}"), timeout=240, interval=0.2)
            reply = _client(f"http://127.0.0.1:{port}").completions.create(
                model="tiny", prompt="a", max_tokens=2
            )
            assert reply.choices[0].finish_reason == "length"
        finally:
            process.terminate()
            out, _ = process.communicate(timeout=30)
        # The server runs on uvloop (a dependency), not the stdlib loop a bare asyncio.run would start.
        assert "moefleet gateway: event loop uvloop" in out, out


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
