"""A group the operator marks draining in the gateway's config file gets no new requests, the file is re-read
without a restart, and the backends metric reports it; the schema round-trips the flag and rejects bad ones."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from gateway.conftest import serve_gateway
from moefleet.engine.gateway import command as gateway_command
from server.conftest import serve_fake_engine, wait_for

from moefleet.gateway_schema import GatewayConfig, GatewayConfigError, mixed_config

pytestmark = pytest.mark.timeout(120)


def _served(server) -> float:
    return sum(
        server.metric("moefleet_requests_total", f'finish_reason="{reason}"') for reason in ("stop", "length")
    )


def test_schema_round_trips_draining_and_names_a_bad_value():
    data = json.loads(mixed_config(["http://a:1", "http://b:1"]).to_json())
    assert "draining" not in data["roles"]["mixed"]["groups"][0]  # files without drains are unchanged
    data["roles"]["mixed"]["groups"][1]["draining"] = True
    config = GatewayConfig.from_dict(data)
    assert [g.draining for g in config.roles["mixed"].groups] == [False, True]
    assert json.loads(config.to_json()) == data
    data["roles"]["mixed"]["groups"][1]["draining"] = "yes"
    with pytest.raises(GatewayConfigError, match=r"roles.mixed.groups\[1\].draining"):
        GatewayConfig.from_dict(data)


def test_a_draining_group_gets_no_new_requests_and_comes_back_when_undrained(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway_command, "CONFIG_CHECK_SECONDS", 0.1)
    with serve_fake_engine() as first, serve_fake_engine() as second:
        path = tmp_path / "config.json"
        data = json.loads(
            mixed_config([first.base_url, second.base_url], routing_policy="round-robin").to_json()
        )
        path.write_text(json.dumps(data))
        with serve_gateway(GatewayConfig.load(path), watch=str(path)) as (url, gateway):
            wait_for(lambda: all(b.healthy for b in gateway.pool.backends.values()), timeout=5)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
            data["roles"]["mixed"]["groups"][1]["draining"] = True
            path.write_text(json.dumps(data))
            wait_for(lambda: gateway.pool.backends["backend-1"].draining, timeout=5)
            before = _served(second)
            for _ in range(6):
                client.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert _served(second) == before and _served(first) >= 6
            metrics = httpx.get(url + "/metrics", timeout=5).text
            assert 'moefleet_gateway_backends{role="mixed",state="draining"} 1.0' in metrics
            assert httpx.get(url + "/health", timeout=5).status_code == 200  # one group still serves
            data["roles"]["mixed"]["groups"][1]["draining"] = False
            path.write_text(json.dumps(data))
            wait_for(lambda: not gateway.pool.backends["backend-1"].draining, timeout=5)
            deadline = time.monotonic() + 10
            while _served(second) == before and time.monotonic() < deadline:
                client.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert _served(second) > before
