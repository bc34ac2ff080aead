"""spec.parse: defaults, the example manifests, and the catalogue of invalid specs (errors name the field)."""

from __future__ import annotations

import pytest
from moefleet.operator.spec import SpecError, parse, parse_duration
from support.operator_catalogue import MANIFESTS, invalid_cases, load_manifest, merge, valid_base


@pytest.mark.parametrize("case", invalid_cases(), ids=lambda c: c["name"])
def test_invalid_spec_is_rejected_naming_the_field(case):
    body = case["body"]
    body["metadata"].setdefault("namespace", "default")
    with pytest.raises(SpecError) as error:
        parse(body)
    assert error.value.field == case["field"], str(error.value)
    assert str(error.value).startswith(case["field"])


def test_defaults_fill_every_optional_field():
    body = merge(valid_base(), {"spec": {"image": None}})
    spec = parse(body, default_image="registry/moefleet:1")
    assert spec.image == "registry/moefleet:1"
    assert spec.model.served_name == "bad"  # the MoEDeployment's name
    assert spec.gateway.routing_policy == "least-load" and spec.gateway.replicas == 1
    assert spec.eplb.enabled and spec.eplb.redundant_experts == 0 and spec.eplb.threshold == 0.8
    assert (spec.eplb.window_seconds, spec.eplb.cooldown_seconds) == (300, 600)
    rp = spec.restart_policy
    assert (rp.backoff_base_seconds, rp.backoff_max_seconds, rp.max_restarts, rp.window_seconds) == (
        30,
        600,
        10,
        3600,
    )
    assert [r.name for r in spec.roles] == ["prefill", "decode"] and spec.disaggregated


def test_missing_image_without_operator_default_names_spec_image():
    with pytest.raises(SpecError, match=r"^spec\.image"):
        parse(merge(valid_base(), {"spec": {"image": None}}))


# Read off the manifests by hand: name -> (experts, redundant experts, {role: (replicas, nodes, GPUs/node)}).
EXPECTED_MANIFESTS = {
    "deepseek-r1-reference.yaml": ("deepseek-r1", 256, 32, {"prefill": (1, 4, 8), "decode": (1, 9, 8)}),
    "kimi-k2-h200.yaml": ("kimi-k2", 384, 96, {"prefill": (1, 4, 8), "decode": (1, 12, 8)}),
    "qwen3-moe-small.yaml": ("qwen3-moe-small", 128, 0, {"mixed": (1, 1, 4)}),
    "glm-4.5.yaml": ("glm-4-5", 160, 0, {"mixed": (1, 2, 8)}),
    "gpt-oss-120b.yaml": ("gpt-oss-120b", 128, 0, {"mixed": (1, 1, 8)}),
    "llama4-maverick.yaml": ("llama4-maverick", 128, 0, {"mixed": (1, 2, 8)}),
}


def test_every_example_manifest_has_expectations():
    assert sorted(EXPECTED_MANIFESTS) == sorted(p.name for p in MANIFESTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_example_manifests_parse_to_the_layout_they_describe(path):
    name, experts, redundant, roles = EXPECTED_MANIFESTS[path.name]
    spec = parse(load_manifest(path), default_image="img")
    assert (spec.name, spec.model.num_experts, spec.eplb.redundant_experts) == (name, experts, redundant)
    got = {r.name: (r.replicas, r.nodes_per_replica, r.gpus_per_node) for r in spec.roles}
    assert got == roles
    assert spec.disaggregated == ("mixed" not in roles)
    for role in spec.roles:  # ranks per group = nodes x GPUs, e.g. 9 x 8 = 72 for DeepSeek's decode
        assert role.ranks_per_group == roles[role.name][1] * roles[role.name][2]


def test_reference_layout_matches_the_reference_deployment():
    spec = parse(load_manifest(next(p for p in MANIFESTS if p.name == "deepseek-r1-reference.yaml")), "img")
    assert (spec.role("prefill").nodes_per_replica, spec.role("decode").nodes_per_replica) == (4, 9)
    assert {r.gpus_per_node for r in spec.roles} == {8}


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), ("1.5h", 5400)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text, "f") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "5 m", "-1s", "1d", 30])
def test_parse_duration_rejects(text):
    with pytest.raises(SpecError, match="^f: .*duration"):
        parse_duration(text, "f")
