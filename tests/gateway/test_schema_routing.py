"""The gateway's config schema (shared with the operator) and its routing decisions: pure, no I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from moefleet.engine.gateway.pool import parse_load
from moefleet.engine.gateway.routing import BackendView, NoBackendError, pick_backend, prefix_key_of
from moefleet.operator.render import gateway_config
from moefleet.operator.spec import parse

from moefleet.gateway_schema import GatewayConfig, GatewayConfigError, mixed_config

MANIFESTS = sorted(Path(__file__).resolve().parents[2].joinpath("manifests").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_example_renders_a_config_the_gateway_accepts(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "MoEDeployment"]
    assert docs, f"{path} has no MoEDeployment"
    for doc in docs:
        doc["metadata"].setdefault("namespace", "llm")
        spec = parse(doc, default_image="moefleet:test")
        rendered = gateway_config(spec)
        parsed = GatewayConfig.from_dict(json.loads(json.dumps(rendered)))
        assert parsed.to_dict() == rendered
        expected_groups = sum(role.replicas for role in spec.roles)
        assert sum(len(r.groups) for r in parsed.roles.values()) == expected_groups
        assert parsed.mode == ("disaggregated" if spec.disaggregated else "mixed")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"routingPolicy": "fastest"}, "routingPolicy"),
        ({"mode": "pd"}, "mode"),
        ({"colour": "red"}, "colour"),
        ({"roles": {"mixed": {"groups": [{"url": "ftp://x"}]}}}, "roles.mixed.groups[0].url"),
        (
            {"roles": {"mixed": {"groups": [{"url": "http://a:1", "ranks": -2}]}}},
            "roles.mixed.groups[0].ranks",
        ),
        ({"roles": {"prefill": {"groups": []}}}, "mode 'mixed' takes only the role 'mixed'"),
        ({"mode": "disaggregated"}, "needs roles 'prefill' and 'decode'"),
        ({"port": 70000}, "port"),
        ({"drainTimeoutSeconds": -1}, "drainTimeoutSeconds"),
        ({"drainTimeoutSeconds": "30s"}, "drainTimeoutSeconds"),
        ({"drainTimeoutSeconds": 1e6}, "drainTimeoutSeconds"),
    ],
)
def test_bad_config_values_are_named(change, field):
    data = {"model": "m", "roles": {"mixed": {"groups": [{"name": "g", "url": "http://10.0.0.1:8000"}]}}}
    data.update(change)
    with pytest.raises(GatewayConfigError) as info:
        GatewayConfig.from_dict(data, source="cm.json")
    assert field in str(info.value) and "cm.json" in str(info.value)


def test_mixed_config_from_urls():
    config = mixed_config(["http://a:8000/", "http://b:9000"])
    assert [g.url for g in config.roles["mixed"].groups] == ["http://a:8000", "http://b:9000"]
    assert config.serving_roles == ("mixed",)


def _views(**loads):
    return [BackendView(name=name, role="mixed", eligible=True, running=load) for name, load in loads.items()]


def test_least_load_picks_the_idlest_eligible_backend():
    backends = _views(a=5, b=1, c=3)
    assert pick_backend(backends, "mixed", "least-load").name == "b"
    assert pick_backend(backends, "mixed", "least-load", exclude=frozenset({"b"})).name == "c"
    # Requests this gateway opened since the last poll count even before the engine reports them.
    burst = [
        BackendView("a", "mixed", True, in_flight=9, running=0),
        BackendView("b", "mixed", True, running=2),
    ]
    assert pick_backend(burst, "mixed", "least-load").name == "b"


def test_unhealthy_or_unlisted_backends_are_never_picked():
    backends = [
        BackendView("a", "mixed", eligible=False),
        BackendView("b", "mixed", eligible=True, running=50),
        BackendView("p", "prefill", eligible=True),
    ]
    assert pick_backend(backends, "mixed", "least-load").name == "b"
    with pytest.raises(NoBackendError, match="no healthy mixed group.*a, b"):
        pick_backend(backends, "mixed", "least-load", exclude=frozenset({"b"}))
    with pytest.raises(NoBackendError, match="no decode group is configured"):
        pick_backend(backends, "decode", "least-load")


def test_round_robin_cycles_in_name_order():
    backends = _views(c=0, a=0, b=0)
    assert [pick_backend(backends, "mixed", "round-robin", turn=t).name for t in range(4)] == [
        "a",
        "b",
        "c",
        "a",
    ]


def test_prefix_cache_keeps_a_prefix_on_one_backend_until_it_is_much_busier():
    backends = _views(a=0, b=0, c=0, d=0)
    keys = [f"system prompt {i}" for i in range(40)]
    chosen = {key: pick_backend(backends, "mixed", "prefix-cache", prefix_key=key).name for key in keys}
    assert len(set(chosen.values())) >= 3  # keys spread over backends
    for key, name in chosen.items():  # stable while loads are even
        assert pick_backend(backends, "mixed", "prefix-cache", prefix_key=key).name == name
    key = keys[0]
    busy = [BackendView(b.name, "mixed", True, running=100 if b.name == chosen[key] else 0) for b in backends]
    assert pick_backend(busy, "mixed", "prefix-cache", prefix_key=key).name != chosen[key]


def test_prefix_key_reads_prompts_and_messages():
    assert prefix_key_of({"prompt": "hello"}) == "hello"
    assert prefix_key_of({"prompt": ["first", "second"]}) == "first"
    assert prefix_key_of({"messages": [{"role": "user", "content": "hi"}]}) == "hi"
    assert len(prefix_key_of({"prompt": "x" * 10_000})) == 256


def test_parse_load_sums_per_rank_series():
    text = (
        "# TYPE moefleet_num_requests_running gauge\n"
        'moefleet_num_requests_running{dp_rank="0"} 3\n'
        'moefleet_num_requests_running{dp_rank="1"} 2\n'
        "# TYPE moefleet_num_requests_waiting gauge\n"
        "moefleet_num_requests_waiting 4\n"
        "# TYPE moefleet_kv_cache_usage_ratio gauge\n"
        'moefleet_kv_cache_usage_ratio{dp_rank="0"} 0.5\n'
        'moefleet_kv_cache_usage_ratio{dp_rank="1"} 0.25\n'
    )
    assert parse_load(text) == (5, 4, 0.375)


def test_parse_load_counts_requests_parked_for_kv_transfer_as_waiting():
    text = (
        "# TYPE moefleet_num_requests_waiting gauge\n"
        "moefleet_num_requests_waiting 1\n"
        "# TYPE moefleet_num_requests_waiting_for_kv gauge\n"
        "moefleet_num_requests_waiting_for_kv 2\n"
        "# TYPE moefleet_num_requests_sending_kv gauge\n"
        "moefleet_num_requests_sending_kv 3\n"
    )
    assert parse_load(text) == (0, 6, 0.0)
