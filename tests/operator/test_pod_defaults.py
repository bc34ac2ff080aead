"""Multi-node defaults, isolation defaults, the hostPath policy, NetworkPolicies and gang renders (pure)."""

from __future__ import annotations

import pytest
from moefleet.operator import gang, network_policy, pod_defaults, render, security
from moefleet.operator import labels as L
from moefleet.operator.settings import from_environment
from moefleet.operator.spec import SpecError, parse
from support.operator_catalogue import merge, valid_base


def _spec(patch=None):
    return parse(merge(valid_base(), {"spec": patch or {}}))


def _engine_pod(spec, role="decode", replica=0, backend=None):
    return render.render_statefulset(spec, role, replica, backend)["spec"]["template"]


# -- defaults ------------------------------------------------------------------------------------------------
def test_shm_requests_gpu_and_probes_by_default():
    spec = _spec({"roles": {"prefill": {"gpusPerNode": 4}}})
    pod = _engine_pod(spec, "prefill")["spec"]
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}  # 4 GiB per GPU x 4
    engine = pod["containers"][0]
    assert engine["resources"] == {
        "requests": {"cpu": "32", "memory": "256Gi"},
        "limits": {L.GPU_RESOURCE: 4},
    }
    assert engine["startupProbe"]["failureThreshold"] * engine["startupProbe"]["periodSeconds"] == 3600
    assert engine["livenessProbe"]["httpGet"] == {"path": "/health/progress", "port": "http"}
    assert pod["terminationGracePeriodSeconds"] == 60


def test_user_values_win_over_defaults():
    spec = _spec(
        {
            "roles": {"decode": {"shmSize": "100Gi", "resources": {"requests": {"cpu": "10"}}}},
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
            "model": {"sizeGB": 700},
            "terminationGracePeriod": "2m",
        }
    )
    pod = _engine_pod(spec)["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "100Gi"
    engine = pod["containers"][0]
    assert engine["resources"]["requests"] == {"cpu": "10", "memory": "512Gi"}  # 8 GPUs x 64 GiB
    env = [e for e in engine["env"] if e["name"] == "NCCL_DEBUG"]
    assert env == [{"name": "NCCL_DEBUG", "value": "INFO"}]  # once, the user's value
    # 600 s + 700 GB / 0.5 GB/s = 2000 s = 200 periods of 10 s.
    assert engine["startupProbe"]["failureThreshold"] == 200
    assert pod["terminationGracePeriodSeconds"] == 120
    args = engine["args"]
    assert args[args.index("--drain-timeout") + 1] == "90"  # 120 - 5 s preStop - 25 s group stop


@pytest.mark.parametrize(
    "patch,engine_drain,gateway_grace",
    [
        ({}, None, 45),  # engines: default 30 s drain; gateway: 5 s preStop + 30 s + 10 s stop
        ({"terminationGracePeriod": "2m"}, "90", 105),  # 120 - 5 - 25 = 90 s for both drains
    ],
)
def test_gateway_drain_fits_its_grace_period_and_matches_the_engines(patch, engine_drain, gateway_grace):
    import json

    from moefleet.gateway_schema import GatewayConfig

    spec = _spec(patch)
    engine = _engine_pod(spec)
    args = engine["spec"]["containers"][0]["args"]
    assert (args[args.index("--drain-timeout") + 1] if "--drain-timeout" in args else None) == engine_drain
    gateway = render.render_gateway_deployment(spec)["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    # The same preStop as the engines' (endpoint removal reaches the proxies before SIGTERM).
    assert container["lifecycle"] == engine["spec"]["containers"][0]["lifecycle"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert gateway["terminationGracePeriodSeconds"] == gateway_grace
    # The gateway reads its drain timeout from the rendered file: the engines' drain (hand-computed above).
    text = render.render_gateway_configmap(spec)["data"][L.GATEWAY_CONFIG_FILE]
    config = GatewayConfig.from_dict(json.loads(text))
    assert config.drain_timeout_s == float(engine_drain or 30)
    assert 5 + config.drain_timeout_s + 10 == gateway["terminationGracePeriodSeconds"]


def test_every_documented_env_default_is_rendered():
    env = {e["name"]: e.get("value") for e in _engine_pod(_spec())["spec"]["containers"][0]["env"]}
    for name, value, why in pod_defaults.ENV_DEFAULTS:
        assert env[name] == value and why


def test_model_secret_is_env_from_and_never_inline():
    spec = _spec({"model": {"secretRef": {"name": "hf-token"}}})
    engine = _engine_pod(spec)["spec"]["containers"][0]
    assert engine["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    with pytest.raises(SpecError, match=r"spec\.model\.secretRef\.name"):
        _spec({"model": {"secretRef": {}}})


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"roles": {"decode": {"shmSize": "lots"}}}, "spec.roles.decode.shmSize"),
        ({"terminationGracePeriod": "10s"}, "spec.terminationGracePeriod"),
        ({"model": {"sizeGB": 0}}, "spec.model.sizeGB"),
        ({"topologyKey": "not a key"}, "spec.topologyKey"),
        ({"gangScheduling": {"mode": "sometimes"}}, "spec.gangScheduling.mode"),
    ],
)
def test_bad_new_fields_are_refused_naming_the_field(patch, field):
    with pytest.raises(SpecError) as error:
        _spec(patch)
    assert error.value.field == field


# -- isolation -----------------------------------------------------------------------------------------------
def test_engine_and_gateway_pods_are_locked_down():
    spec = _spec()
    for pod in (
        _engine_pod(spec)["spec"],
        render.render_gateway_deployment(spec)["spec"]["template"]["spec"],
    ):
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = pod["containers"][0]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # writable under a RO root


def test_host_path_needs_the_operator_setting():
    spec = _spec({"model": {"volume": {"hostPath": {"path": "/data"}}}})
    with pytest.raises(SpecError) as error:
        security.check_model_volume(spec, allow_host_path=False)
    assert error.value.field == "spec.model.volume.hostPath" and "allowHostPath" in str(error.value)
    security.check_model_volume(spec, allow_host_path=True)
    security.check_model_volume(_spec({"model": {"pvc": {"claimName": "w"}}}), allow_host_path=False)


def test_boolean_settings_parse_and_refuse_garbage():
    assert from_environment({"MOEFLEET_OPERATOR_ALLOW_HOST_PATH": "true"}).allow_host_path is True
    assert from_environment({"MOEFLEET_OPERATOR_ALLOW_HOST_PATH": "false"}).allow_host_path is False
    assert from_environment({}).allow_host_path is False
    with pytest.raises(ValueError, match="MOEFLEET_OPERATOR_ALLOW_HOST_PATH"):
        from_environment({"MOEFLEET_OPERATOR_ALLOW_HOST_PATH": "yes please"})


# -- NetworkPolicies: checked with an independent evaluator of the NetworkPolicy semantics ----------------------
def _selects(selector, labels):
    return selector.get("matchLabels", {}).items() <= labels.items()


def _allowed(policies, source, target, port):
    """Kubernetes' rule: a pod selected by some Ingress policy accepts a connection only if some rule of
    some selecting policy matches the source (peer) and the port. `source`/`target`: (namespace, labels)."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target[1])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"]["ingress"]:
            ports = rule.get("ports")
            if ports and not any(p["port"] == port for p in ports):
                continue
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    ns_ok = _selects(
                        peer["namespaceSelector"], {network_policy.NAMESPACE_NAME_LABEL: source[0]}
                    )
                else:
                    ns_ok = source[0] == policy["metadata"]["namespace"]
                pod_ok = _selects(peer["podSelector"], source[1]) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_isolate_groups_and_open_only_what_is_needed():
    spec = _spec({"roles": {"decode": {"replicas": 2}}})
    policies = render.render_network_policies(
        spec, operator_namespace="moefleet-system", metrics_namespace="mon"
    )
    assert {p["metadata"]["name"] for p in policies} == {"bad-prefill-0", "bad-decode-0", "bad-decode-1"}
    ns = spec.namespace

    def pod(role, replica, deployment="bad"):
        return (ns, L.group_labels(deployment, role, replica))

    gateway = (ns, L.common_labels("bad", L.COMPONENT_GATEWAY))
    operator = ("moefleet-system", {L.COMPONENT: "operator", L.NAME: "moefleet"})
    prometheus = ("mon", {"app": "prometheus"})
    stranger = ("other", {"app": "x"})
    http, dist, nccl = L.ENGINE_HTTP_PORT, L.ENGINE_MASTER_PORT, 41234
    d0, d1, p0 = pod("decode", 0), pod("decode", 1), pod("prefill", 0)
    # Within a group: everything (rendezvous, TCPStore, NCCL's ephemeral ports).
    assert all(_allowed(policies, d0, d0, port) for port in (http, dist, nccl))
    # Another group of the same role cannot reach the rendezvous/TCPStore (the abort key) nor NCCL.
    assert not _allowed(policies, d1, d0, dist) and not _allowed(policies, d1, d0, nccl)
    assert not _allowed(policies, d0, p0, dist)
    # The KV transfer: prefill -> decode on any port, never decode -> prefill's rendezvous.
    assert _allowed(policies, p0, d1, nccl)
    # HTTP: gateway, operator and Prometheus only.
    for source in (gateway, operator, prometheus):
        assert _allowed(policies, source, d0, http) and not _allowed(policies, source, d0, dist)
    assert not _allowed(policies, stranger, d0, http)
    assert not _allowed(policies, pod("decode", 0, "other"), d0, http)  # another deployment's engines
    # Metrics peers from the spec replace the operator's default namespace.
    custom = _spec(
        {"networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]}}
    )
    policies = render.render_network_policies(custom, metrics_namespace="mon")
    assert not _allowed(policies, prometheus, pod("decode", 0), http)
    assert render.render_network_policies(_spec({"networkPolicy": {"enabled": False}})) == []


# -- gang placement --------------------------------------------------------------------------------------------
ALL = {b.crd for b in gang.BACKENDS}


def test_backend_choice_prefers_kueue_with_a_queue_then_volcano_then_coscheduling():
    assert gang.choose_backend(_spec(), set()) is None
    assert gang.choose_backend(_spec(), ALL) is gang.VOLCANO  # Kueue needs a queue name
    queued = _spec({"gangScheduling": {"queueName": "gpu-queue"}})
    assert gang.choose_backend(queued, ALL) is gang.KUEUE
    assert gang.choose_backend(_spec(), {gang.COSCHEDULING.crd}) is gang.COSCHEDULING
    assert gang.choose_backend(_spec({"gangScheduling": {"mode": "off"}}), ALL) is None
    assert "best effort" in gang.placement_status(_spec(), None)["message"]
    assert gang.placement_status(_spec(), gang.VOLCANO)["gangScheduler"] == "volcano"


def test_each_group_is_one_gang_of_its_nodes():
    spec = _spec()
    decode = spec.role("decode")
    for backend, api_version in (
        (gang.VOLCANO, "scheduling.volcano.sh/v1beta1"),
        (gang.COSCHEDULING, "scheduling.x-k8s.io/v1alpha1"),
    ):
        groups = render.render_pod_groups(spec, backend)
        assert [(g["apiVersion"], g["metadata"]["name"], g["spec"]["minMember"]) for g in groups] == [
            (api_version, "bad-prefill-0", 1),
            (api_version, "bad-decode-0", decode.nodes_per_replica),
        ]
        assert all(g["metadata"]["ownerReferences"][0]["uid"] == spec.uid for g in groups)
    volcano = _engine_pod(spec, backend=gang.VOLCANO)
    assert volcano["metadata"]["annotations"] == {gang.VOLCANO_GROUP_ANNOTATION: "bad-decode-0"}
    assert volcano["spec"]["schedulerName"] == "volcano"
    cosched = _engine_pod(spec, backend=gang.COSCHEDULING)
    assert cosched["metadata"]["labels"][gang.COSCHEDULING_LABEL] == "bad-decode-0"
    queued = _spec({"gangScheduling": {"queueName": "q"}})
    sts = render.render_statefulset(queued, "decode", 0, gang.KUEUE)
    assert sts["metadata"]["labels"][gang.KUEUE_QUEUE_LABEL] == "q"
    assert sts["spec"]["template"]["metadata"]["labels"][gang.KUEUE_QUEUE_LABEL] == "q"
    assert render.render_pod_groups(queued, gang.KUEUE) == []  # Kueue builds its own workload
    plain = _engine_pod(spec)
    assert "schedulerName" not in plain["spec"] and "annotations" not in plain["metadata"]


def test_topology_key_adds_a_required_same_group_affinity_per_role():
    spec = _spec({"topologyKey": "ib.example.com/fabric", "roles": {"prefill": {"topologyKey": "rack"}}})
    for role, key in (("decode", "ib.example.com/fabric"), ("prefill", "rack")):
        affinity = _engine_pod(spec, role)["spec"]["affinity"]["podAffinity"]
        assert affinity["requiredDuringSchedulingIgnoredDuringExecution"] == [
            {
                "labelSelector": {"matchLabels": {L.GROUP_LABEL: f"bad-{role}-0"}},
                "topologyKey": key,
            }
        ]
        assert affinity["preferredDuringSchedulingIgnoredDuringExecution"]  # the zone preference stays
    assert (
        "requiredDuringSchedulingIgnoredDuringExecution"
        not in _engine_pod(_spec())["spec"]["affinity"]["podAffinity"]
    )
