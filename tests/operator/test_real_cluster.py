"""Issue 13 on the local control plane: the pod template overlay and defaults reach the pods, NetworkPolicies,
the hostPath policy, gang PodGroups when a gang scheduler's CRD exists, and the chart's RBAC (can-i matrix)
in watchNamespaces mode."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml
from support import binaries
from support.operator_cluster import (
    CHART,
    ENGINE,
    SYSTEM_NAMESPACE,
    condition,
    get_moed,
    list_items,
    patch_spec,
    small_moed,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_overlay_defaults_and_topology_reach_the_running_pods(operator, pool, kube_cluster, kube_namespace):
    body = small_moed(
        "ovl",
        topologyKey="topology.kubernetes.io/zone",
        podTemplate={
            "metadata": {"labels": {"team": "llm"}, "annotations": {"example.com/fabric": "ib0"}},
            "spec": {
                "containers": [
                    {
                        "name": "engine",
                        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
                        "resources": {"limits": {"rdma/rdma_shared_device_a": 1}},
                        "env": [
                            {"name": "NCCL_IB_HCA", "value": "mlx5_0"},
                            {"name": "NCCL_DEBUG", "value": "INFO"},
                        ],
                    }
                ]
            },
        },
    )
    body["spec"]["roles"]["decode"]["podTemplate"] = {
        "spec": {"hostIPC": True, "tolerations": [{"key": "example.com/ib", "operator": "Exists"}]}
    }
    body["spec"]["model"]["secretRef"] = {"name": "hf-token"}
    kube_cluster.apply(body, kube_namespace)
    wait_ready(kube_cluster, kube_namespace, "ovl", timeout=180)
    pods = list_items(
        kube_cluster, f"/api/v1/namespaces/{kube_namespace}/pods", f"moefleet.ai/deployment=ovl,{ENGINE}"
    )
    assert len(pods) == 3
    nodes = {n["metadata"]["name"]: n for n in kube_cluster.api_get("/api/v1/nodes")["items"]}
    zones: dict[str, set[str]] = {}
    for pod in pods:
        meta, spec = pod["metadata"], pod["spec"]
        role = meta["labels"]["moefleet.ai/role"]
        assert meta["labels"]["team"] == "llm" and meta["annotations"]["example.com/fabric"] == "ib0"
        engine = spec["containers"][0]
        assert engine["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
        assert engine["resources"]["requests"]["cpu"] == "64"  # the default: 8 cores per GPU
        assert engine["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        env = {e["name"]: e for e in engine["env"]}
        assert env["NCCL_IB_HCA"]["value"] == "mlx5_0" and env["NCCL_DEBUG"]["value"] == "INFO"
        assert env["MOEFLEET_NODE_RANK"]["valueFrom"]  # the operator's rank env is intact
        assert engine["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        assert engine["livenessProbe"]["httpGet"]["path"] == "/health/progress"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(v["name"] == "kube-api-access" or "projected" in v for v in spec["volumes"])
        assert spec.get("hostIPC", False) == (role == "decode")
        zones.setdefault(meta["labels"]["moefleet.ai/group"], set()).add(
            nodes[spec["nodeName"]]["metadata"]["labels"]["topology.kubernetes.io/zone"]
        )
    assert all(len(z) == 1 for z in zones.values()), zones  # each group inside one zone (topologyKey)

    # One NetworkPolicy per group, selecting exactly that group's pods, owned by the MoEDeployment.
    policies = list_items(
        kube_cluster,
        f"/apis/networking.k8s.io/v1/namespaces/{kube_namespace}/networkpolicies",
        "moefleet.ai/deployment=ovl",
    )
    assert sorted(p["metadata"]["name"] for p in policies) == ["ovl-decode-0", "ovl-prefill-0"]
    for policy in policies:
        group = policy["metadata"]["name"]
        assert policy["spec"]["podSelector"]["matchLabels"]["moefleet.ai/group"] == group
        assert policy["metadata"]["ownerReferences"][0]["kind"] == "MoEDeployment"
        selected = {
            p["metadata"]["name"] for p in pods if p["metadata"]["labels"]["moefleet.ai/group"] == group
        }
        assert selected == {f"{group}-{i}" for i in range(len(selected))}
    moed = get_moed(kube_cluster, kube_namespace, "ovl")
    assert moed["status"]["placement"]["gangScheduler"] == "none"
    assert "best effort" in moed["status"]["placement"]["message"]


def test_an_owned_field_in_the_overlay_is_refused_at_admission(moefleet_chart, kube_namespace):
    body = small_moed(
        "bad-ovl", podTemplate={"spec": {"containers": [{"name": "engine", "args": ["--port", "1"]}]}}
    )
    result = moefleet_chart.kubectl(
        "apply", "-n", kube_namespace, "-f", "-", input=json.dumps(body), check=False
    )
    assert result.returncode != 0
    assert (
        "spec.podTemplate.spec.containers[0]" in result.stderr and "rendered by the operator" in result.stderr
    )


def test_host_path_model_volume_is_refused_naming_the_field(operator, pool, kube_cluster, kube_namespace):
    body = small_moed("hostpath")
    body["spec"]["model"] = {"path": "/models/tiny", "volume": {"hostPath": {"path": "/data"}}}
    kube_cluster.apply(body, kube_namespace)

    def degraded() -> bool:
        status = get_moed(kube_cluster, kube_namespace, "hostpath").get("status") or {}
        return any(
            c["type"] == "Degraded"
            and c["status"] == "True"
            and "spec.model.volume.hostPath" in c.get("message", "")
            for c in status.get("conditions") or []
        )

    wait_for(degraded, 60, "Degraded naming spec.model.volume.hostPath")
    assert (
        "allowHostPath"
        in condition(get_moed(kube_cluster, kube_namespace, "hostpath"), "Degraded")["message"]
    )
    sets = list_items(
        kube_cluster,
        f"/apis/apps/v1/namespaces/{kube_namespace}/statefulsets",
        "moefleet.ai/deployment=hostpath",
    )
    assert sets == []


COSCHEDULING_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podgroups.scheduling.x-k8s.io"},
    "spec": {
        "group": "scheduling.x-k8s.io",
        "scope": "Namespaced",
        "names": {
            "kind": "PodGroup",
            "plural": "podgroups",
            "singular": "podgroup",
            "listKind": "PodGroupList",
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def test_each_group_is_one_pod_group_when_coscheduling_is_installed(
    operator, pool, kube_cluster, kube_namespace
):
    kube_cluster.apply(COSCHEDULING_CRD)
    try:
        kube_cluster.kubectl(
            "wait", "--for=condition=Established", "crd/podgroups.scheduling.x-k8s.io", "--timeout=60s"
        )
        kube_cluster.apply(small_moed("gang"), kube_namespace)
        path = f"/apis/scheduling.x-k8s.io/v1alpha1/namespaces/{kube_namespace}/podgroups"

        def pod_groups() -> dict[str, int]:
            items = list_items(kube_cluster, path, "moefleet.ai/deployment=gang")
            return {g["metadata"]["name"]: g["spec"]["minMember"] for g in items}

        wait_for(
            lambda: pod_groups() == {"gang-prefill-0": 1, "gang-decode-0": 2}, 60, "one PodGroup per group"
        )
        wait_ready(kube_cluster, kube_namespace, "gang", timeout=180)
        pods = list_items(
            kube_cluster, f"/api/v1/namespaces/{kube_namespace}/pods", f"moefleet.ai/deployment=gang,{ENGINE}"
        )
        assert {p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] for p in pods} == {
            "gang-prefill-0",
            "gang-decode-0",
        }
        assert all(
            p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"]
            == p["metadata"]["labels"]["moefleet.ai/group"]
            for p in pods
        )
        placement = get_moed(kube_cluster, kube_namespace, "gang")["status"]["placement"]
        assert placement["gangScheduler"] == "coscheduling"

        # Converged: reconciles (every second here) make no PodGroup request at all. (Deployments of earlier
        # tests' namespaces may still be reconciled while those namespaces terminate: wait for a quiet 4 s.)
        operator.wait_quiet("podgroups", quiet_s=4, timeout=60)
        # A new group gets its PodGroup; a removed group's PodGroup goes.
        patch_spec(kube_cluster, kube_namespace, "gang", {"roles": {"decode": {"replicas": 2}}})
        wait_for(lambda: pod_groups().get("gang-decode-1") == 2, 60, "the new group's PodGroup")
        patch_spec(kube_cluster, kube_namespace, "gang", {"roles": {"decode": {"replicas": 1}}})
        wait_for(lambda: "gang-decode-1" not in pod_groups(), 60, "the removed group's PodGroup deleted")
    finally:
        kube_cluster.kubectl("delete", "moed", "gang", "-n", kube_namespace, "--wait=false", check=False)
        kube_cluster.kubectl("delete", "crd", "podgroups.scheduling.x-k8s.io", "--wait=false", check=False)


def _crd(group: str, plural: str, kind: str, version: str) -> dict:
    crd = json.loads(json.dumps(COSCHEDULING_CRD))
    crd["metadata"]["name"] = f"{plural}.{group}"
    crd["spec"].update(group=group, names={"kind": kind, "plural": plural, "singular": kind.lower()})
    crd["spec"]["versions"][0]["name"] = version
    return crd


@pytest.mark.parametrize("scheduler", ["volcano", "kueue"])
def test_volcano_and_kueue_gangs_are_rendered_when_their_crds_exist(
    operator, pool, kube_cluster, kube_namespace, scheduler
):
    """Objects only: no Volcano or Kueue controller runs here (Volcano's pods wait for its scheduler)."""
    crd = (
        _crd("scheduling.volcano.sh", "podgroups", "PodGroup", "v1beta1")
        if scheduler == "volcano"
        else _crd("kueue.x-k8s.io", "workloads", "Workload", "v1beta1")
    )
    kube_cluster.apply(crd)
    name = f"gang-{scheduler}"
    try:
        kube_cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s"
        )
        # The operator caches "is this CRD installed?" for crd_cache_seconds: a reconcile of an earlier test's
        # deployment may have cached "absent" just before. Created inside that window, the groups would be
        # rendered best effort first and then re-formed one at a time (the staged rollout), not at once.
        time.sleep(operator.crd_cache_seconds + 0.5)
        body = small_moed(name, gangScheduling={"queueName": "gpu-queue"} if scheduler == "kueue" else {})
        kube_cluster.apply(body, kube_namespace)

        def placement() -> str:
            return (
                (get_moed(kube_cluster, kube_namespace, name).get("status") or {}).get("placement") or {}
            ).get("gangScheduler", "")

        wait_for(lambda: placement() == scheduler, 60, f"status.placement {scheduler}")
        selector = f"moefleet.ai/deployment={name}"
        sts_path = f"/apis/apps/v1/namespaces/{kube_namespace}/statefulsets"
        wait_for(lambda: len(list_items(kube_cluster, sts_path, selector)) == 2, 60, "two StatefulSets")
        sets = {s["metadata"]["name"]: s for s in list_items(kube_cluster, sts_path, selector)}
        if scheduler == "volcano":
            path = f"/apis/scheduling.volcano.sh/v1beta1/namespaces/{kube_namespace}/podgroups"
            groups = {
                g["metadata"]["name"]: g["spec"]["minMember"]
                for g in list_items(kube_cluster, path, selector)
            }
            assert groups == {f"{name}-prefill-0": 1, f"{name}-decode-0": 2}
            for sts_name, sts in sets.items():
                template = sts["spec"]["template"]
                assert template["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == sts_name
                assert template["spec"]["schedulerName"] == "volcano"
        else:
            for sts in sets.values():
                assert sts["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
                assert (
                    sts["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
                )
    finally:
        kube_cluster.kubectl("delete", "moed", name, "-n", kube_namespace, "--wait=false", check=False)
        kube_cluster.kubectl("delete", "crd", crd["metadata"]["name"], "--wait=false", check=False)


def _helm_template(*sets: str) -> list[dict]:
    helm = binaries.require()["helm"]
    args = [a for s in sets for a in ("--set", s)]
    result = subprocess.run(
        [str(helm), "template", "scoped", str(CHART), "-n", SYSTEM_NAMESPACE, "--kube-version",
         binaries.KUBERNETES_VERSION, *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_watch_namespaces_rbac_can_i_matrix(moefleet_chart):
    """The chart in watchNamespaces mode: the operator's ServiceAccount may manage workloads only in the
    watched namespace and may read no Secret anywhere (it only creates the admin token Secret)."""
    cluster = moefleet_chart
    watched, other = "rbac-watched", "rbac-other"
    for namespace in (watched, other):
        cluster.kubectl("create", "namespace", namespace, check=False)
    docs = _helm_template(
        f"operator.watchNamespaces={{{watched}}}",
        "fullnameOverride=moefleet-scoped",
        "serviceAccount.name=moefleet-scoped",
    )
    rbac_kinds = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    objects = [d for d in docs if d["kind"] in rbac_kinds]
    assert {d["kind"] for d in objects} == rbac_kinds
    for obj in objects:  # helm install would put the ServiceAccount into the release namespace
        if obj["kind"] == "ServiceAccount":
            obj["metadata"]["namespace"] = SYSTEM_NAMESPACE
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    sa = f"system:serviceaccount:{SYSTEM_NAMESPACE}:moefleet-scoped"
    try:
        matrix = [
            # (verb, resource, namespace or None for cluster scope, expected)
            ("create", "statefulsets.apps", watched, "yes"),
            ("patch", "networkpolicies.networking.k8s.io", watched, "yes"),
            ("delete", "pods", watched, "yes"),
            ("create", "secrets", watched, "yes"),
            ("get", "secrets", watched, "no"),
            ("list", "secrets", watched, "no"),
            ("watch", "secrets", watched, "no"),
            ("create", "pods", watched, "no"),
            ("create", "statefulsets.apps", other, "no"),
            ("create", "deployments.apps", other, "no"),
            ("create", "pods", other, "no"),
            ("delete", "pods", other, "no"),
            ("create", "secrets", other, "no"),
            ("get", "secrets", other, "no"),
            ("list", "moedeployments.moefleet.ai", other, "no"),
            ("get", "secrets", SYSTEM_NAMESPACE, "no"),
            ("get", "customresourcedefinitions.apiextensions.k8s.io", None, "yes"),
            ("list", "nodes", None, "yes"),  # read-only: NotReady nodes (never-stuck handling)
            ("delete", "nodes", None, "no"),
            ("patch", "nodes", None, "no"),
            ("create", "clusterroles.rbac.authorization.k8s.io", None, "no"),
        ]
        wrong = []
        for verb, resource, namespace, expected in matrix:
            scope = ["-n", namespace] if namespace else []
            got = cluster.kubectl(
                "auth", "can-i", verb, resource, "--as", sa, *scope, check=False
            ).stdout.strip()
            if got != expected:
                wrong.append(f"{verb} {resource} in {namespace or 'cluster'}: {got}, expected {expected}")
        assert not wrong, wrong
    finally:
        for obj in objects:
            meta = obj["metadata"]
            scope = ["-n", meta["namespace"]] if meta.get("namespace") else []
            cluster.kubectl("delete", obj["kind"], meta["name"], *scope, "--wait=false", check=False)
        for namespace in (watched, other):
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
