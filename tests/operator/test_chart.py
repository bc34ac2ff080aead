"""The Helm chart: lint, schema, CRD copy, documented values, least-privilege RBAC, install into a cluster."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from support import binaries
from support.operator_cluster import CHART, REPO, SYSTEM_NAMESPACE

KUBE_VERSION = binaries.KUBERNETES_VERSION  # helm template renders offline for this version

# Verbs and resources the operator may hold (operator/kube.py + kopf's watches); anything else is a leak.
ALLOWED = {
    ("moefleet.ai", "moedeployments"): {"get", "list", "watch", "patch"},
    ("moefleet.ai", "moedeployments/status"): {"get", "patch"},
    ("moefleet.ai", "moedeployments/finalizers"): {"update"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("monitoring.coreos.com", "podmonitors"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "pods/status"): {"patch"},
    ("", "secrets"): {"create"},  # the admin token Secret: created, never read (derived from the chart key)
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch", "delete"},
    ("scheduling.x-k8s.io", "podgroups"): {"get", "list", "create", "patch", "delete"},
    ("scheduling.volcano.sh", "podgroups"): {"get", "list", "create", "patch", "delete"},
    ("", "events"): {"create", "patch", "list"},  # list: a StatefulSet's FailedCreate message
    ("events.k8s.io", "events"): {"create", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},  # moefleet_crds index
    ("", "nodes"): {"get", "list", "watch"},  # NotReady nodes: group not Ready, force-delete stuck pods
}
# Leader election: a Role in the release namespace, on the operator's own Lease only (create can't be named).
LEASE_ALLOWED = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def test_chart_crd_is_identical_to_the_canonical_crd():
    canonical = (REPO / "crds" / "moefleet.ai_moedeployments.yaml").read_bytes()
    assert (CHART / "crds" / "moefleet.ai_moedeployments.yaml").read_bytes() == canonical, (
        "copy crds/moefleet.ai_moedeployments.yaml to charts/moefleet/crds/"
    )


def test_every_values_key_is_documented():
    """Each top-level and second-level key has a comment right above it (deeper keys are parts of a value)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped and indent <= 2:
            assert lines[i - 1].strip().startswith("#"), (
                f"values.yaml:{i + 1} {stripped!r} has no comment above it"
            )


def test_values_schema_is_valid_json_and_covers_every_top_level_key():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])
    assert schema["additionalProperties"] is False


def _helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        helm = binaries.require()["helm"]
    except binaries.BinariesMissing as error:
        pytest.fail(str(error), pytrace=False)
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=check)


@pytest.mark.cluster
def test_helm_lint_strict():
    result = _helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("operator.workers=0", "workers"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.resyncSeconds=0", "resyncSeconds"),
        ("unknownKey=1", "unknownKey"),
        ("operator.prometheusUrl=prometheus:9090", "prometheusUrl"),
        ("serviceMonitor.interval=often", "interval"),
        ("dashboards.enable=true", "enable"),
    ],
)
def test_values_schema_rejects_bad_values(setting, field):
    result = _helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False)
    assert result.returncode != 0 and field in result.stderr, result.stderr


def _rendered(*sets: str) -> list[dict]:
    args = [a for s in sets for a in ("--set", s)]
    result = _helm(
        "template",
        "moefleet",
        str(CHART),
        "-n",
        SYSTEM_NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *args,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _check_rules(rules: list[dict]) -> set[tuple[str, str]]:
    seen = set()
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"], rule
                if resource == "secrets":  # only what the admin token needs: never get/list/watch/patch
                    assert set(rule["verbs"]) == {"create"}, rule
                allowed = ALLOWED.get((group, resource))
                assert allowed is not None, f"unexpected permission on {group}/{resource}"
                assert set(rule["verbs"]) <= allowed, f"{group}/{resource}: {rule['verbs']} beyond {allowed}"
                seen.add((group, resource))
    return seen


@pytest.mark.cluster
def test_rbac_is_least_privilege_cluster_wide_and_per_namespace():
    docs = _rendered()
    roles = [d for d in docs if d["kind"] == "ClusterRole"]
    granted = set().union(*(_check_rules(r["rules"]) for r in roles))
    assert granted == set(ALLOWED), f"missing: {set(ALLOWED) - granted}"
    [lease_role] = [d for d in docs if d["kind"] == "Role"]
    assert lease_role["metadata"]["namespace"] == SYSTEM_NAMESPACE
    for rule in lease_role["rules"]:
        assert {(g, r) for g in rule["apiGroups"] for r in rule["resources"]} == set(LEASE_ALLOWED), rule
        assert set(rule["verbs"]) <= LEASE_ALLOWED[("coordination.k8s.io", "leases")], rule
        assert rule["verbs"] == ["create"] or rule.get("resourceNames") == ["moefleet"], rule
    scoped = _rendered("operator.watchNamespaces={team-a,team-b}")
    assert sorted(d["metadata"]["namespace"] for d in scoped if d["kind"] == "Role") == [
        SYSTEM_NAMESPACE, "team-a", "team-b",
    ]  # fmt: skip
    deployment = next(d for d in scoped if d["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--namespace=team-a" in command and "--all-namespaces" not in command
    cluster_roles = [d for d in scoped if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["moefleet-crds"]  # CRD + node reads only


@pytest.mark.cluster
def test_chart_runs_two_leader_elected_replicas_with_a_pdb():
    docs = _rendered()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    namespace = env["MOEFLEET_OPERATOR_LEADER_ELECTION_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert namespace == "metadata.namespace"
    assert env["MOEFLEET_OPERATOR_LEADER_ELECTION_LEASE_NAME"]["value"] == "moefleet"
    [pdb] = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    single = _rendered("operator.leaderElection.enabled=false")
    deployment = next(d for d in single if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not [d for d in single if d["kind"] in ("PodDisruptionBudget", "Role")]


@pytest.mark.cluster
def test_helm_test_hook_checks_the_operator_health_endpoint():
    docs = _rendered()
    hook = next(d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test")
    script = hook["spec"]["containers"][0]["command"][-1]
    assert f"moefleet.{SYSTEM_NAMESPACE}.svc:8080/healthz" in script
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["command"]
    assert container["livenessProbe"]["httpGet"]["port"] == "health"


@pytest.mark.cluster
def test_helm_install_creates_the_operator_objects(moefleet_chart):
    cluster = moefleet_chart
    for kind, name in [
        ("serviceaccount", "moefleet"),
        ("deployment", "moefleet"),
        ("service", "moefleet"),
    ]:
        cluster.kubectl("get", kind, name, "-n", SYSTEM_NAMESPACE)
    for kind, name in [
        ("clusterrole", "moefleet"),
        ("clusterrolebinding", "moefleet"),
        ("crd", "moedeployments.moefleet.ai"),
    ]:
        cluster.kubectl("get", kind, name)
    sa = f"system:serviceaccount:{SYSTEM_NAMESPACE}:moefleet"
    for verb, resource, expected in [
        ("list", "moedeployments.moefleet.ai", "yes"),
        ("patch", "moedeployments.moefleet.ai/status", "yes"),
        ("delete", "pods", "yes"),
        ("create", "statefulsets.apps", "yes"),
        ("create", "secrets", "yes"),
        ("get", "secrets", "no"),
        ("list", "secrets", "no"),
        ("watch", "secrets", "no"),
        ("create", "pods", "no"),
        ("delete", "nodes", "no"),
    ]:
        got = cluster.kubectl("auth", "can-i", verb, resource, "--as", sa, "-A", check=False).stdout.strip()
        assert got == expected, f"can {sa} {verb} {resource}? {got}, expected {expected}"
