"""Pure rendering: MoEDeploymentSpec -> the exact Kubernetes objects the operator owns.

No API calls and no clock: the same spec always renders the same objects (golden files in
tests/operator/data/ show them). Every object carries the common labels, an owner reference to the
MoEDeployment (so deleting it garbage-collects everything) and a spec-hash annotation (so an unchanged object
is never written again).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any

from moefleet.operator import gang, network_policy, pod_defaults, security
from moefleet.operator import labels as L
from moefleet.operator.gang import GangBackend
from moefleet.operator.pod_overlay import apply_overlays
from moefleet.operator.spec import MoEDeploymentSpec, RoleSpec

from moefleet.gateway_schema import GatewayConfig, GroupEndpoint, RoleEndpoints

Obj = dict[str, Any]


def owner_reference(spec: MoEDeploymentSpec) -> Obj:
    return {
        "apiVersion": L.API_VERSION,
        "kind": L.KIND,
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_hash(obj: Obj) -> str:
    """Stable hash of an object's content, ignoring the spec-hash annotation itself."""
    metadata = obj.get("metadata", {})
    annotations = metadata.get("annotations", {})
    if L.SPEC_HASH in annotations:  # a finished object: hash it as it was before the annotation (no copy)
        annotations = {k: v for k, v in annotations.items() if k != L.SPEC_HASH}
        obj = {**obj, "metadata": {**metadata, "annotations": annotations}}
    encoded = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _finish(spec: MoEDeploymentSpec, obj: Obj) -> Obj:
    metadata = obj["metadata"]
    metadata["namespace"] = spec.namespace
    metadata["ownerReferences"] = [owner_reference(spec)]
    metadata.setdefault("annotations", {})
    metadata["annotations"][L.SPEC_HASH] = object_hash(obj)
    return obj


def master_address(spec: MoEDeploymentSpec, role: str, replica: int) -> str:
    """Stable DNS name of node rank 0 of a group (pod 0 behind the group's headless Service)."""
    group = L.group_name(spec.name, role, replica)
    return f"{group}-0.{group}.{spec.namespace}.svc"


def engine_args(spec: MoEDeploymentSpec, role: RoleSpec, replica: int) -> list[str]:
    """`moefleet serve` arguments; the node rank comes from the pod-index label through $(MOEFLEET_NODE_RANK).

    Only flags `moefleet serve` has; the role and EPLB settings travel as MOEFLEET_* environment variables.
    """
    args = [
        "--model", spec.model.path,
        "--served-model-name", spec.model.served_name,
        "--host", "0.0.0.0",
        "--port", str(L.ENGINE_HTTP_PORT),
        "--device", "cuda",
        "--nnodes", str(role.nodes_per_replica),
        "--node-rank", "$(MOEFLEET_NODE_RANK)",
        "--nproc-per-node", str(role.gpus_per_node),
        "--master-addr", master_address(spec, role.name, replica),
        "--master-port", str(L.ENGINE_MASTER_PORT),
    ]  # fmt: skip
    if spec.termination_grace_seconds is not None:  # the drain gets what the grace period leaves
        args += ["--drain-timeout", f"{drain_timeout_s(spec):g}"]
    return args + list(spec.engine_args) + list(role.engine_args)


def _engine_env(spec: MoEDeploymentSpec, role: RoleSpec, replica: int) -> list[Obj]:
    def field_ref(path: str) -> Obj:
        return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}

    env: list[Obj] = [
        {"name": "MOEFLEET_DEPLOYMENT", "value": spec.name},
        {"name": "MOEFLEET_ROLE", "value": role.name},
        {"name": "MOEFLEET_GROUP", "value": L.group_name(spec.name, role.name, replica)},
        {"name": "MOEFLEET_NNODES", "value": str(role.nodes_per_replica)},
        {"name": "MOEFLEET_NPROC_PER_NODE", "value": str(role.gpus_per_node)},
        {"name": "MOEFLEET_NODE_RANK", "valueFrom": field_ref(f"metadata.labels['{L.POD_INDEX}']")},
        {"name": "MOEFLEET_MASTER_ADDR", "value": master_address(spec, role.name, replica)},
        {"name": "MOEFLEET_MASTER_PORT", "value": str(L.ENGINE_MASTER_PORT)},
        {"name": "MOEFLEET_SERVED_MODEL_NAME", "value": spec.model.served_name},
        {"name": "MOEFLEET_EPLB_ENABLED", "value": "true" if spec.eplb.enabled else "false"},
        {"name": "MOEFLEET_EPLB_REDUNDANT_EXPERTS", "value": str(spec.eplb.redundant_experts)},
        # The admin API's bearer token (POST /admin/eplb/rebalance from the operator's EPLB trigger).
        {
            "name": "MOEFLEET_ADMIN_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": f"{spec.name}-admin", "key": "token"}},
        },
        {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field_ref("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field_ref("status.podIP")},
    ]
    return env + pod_defaults.default_env(spec.env) + [dict(item) for item in spec.env]


def _model_volume(spec: MoEDeploymentSpec) -> Obj | None:
    if spec.model.claim_name:
        return {
            "name": "model",
            "persistentVolumeClaim": {"claimName": spec.model.claim_name, "readOnly": True},
        }
    if spec.model.volume:
        return {"name": "model", **copy.deepcopy(dict(spec.model.volume))}
    return None


def _resources(resources: Any, gpus: int | None) -> Obj:
    out: Obj = copy.deepcopy(dict(resources or {}))
    if gpus:
        out["limits"] = {**out.get("limits", {}), L.GPU_RESOURCE: gpus}
    return out


def _group_affinity(spec: MoEDeploymentSpec, role: RoleSpec, replica: int) -> Obj:
    if role.affinity:
        return copy.deepcopy(dict(role.affinity))
    # Default: keep a group's nodes in one zone (its all-to-all traffic must not cross zones).
    return {
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {
                            "matchLabels": {L.GROUP_LABEL: L.group_name(spec.name, role.name, replica)}
                        },
                        "topologyKey": "topology.kubernetes.io/zone",
                    },
                }
            ]
        }
    }


# Graceful drain (engine/server/drain.py): the preStop sleep lets the endpoint removal reach every proxy before
# SIGTERM; the grace period covers it + the engine's --drain-timeout (default 30 s) + the ordered group stop.
PRESTOP_SLEEP_S = 5
GROUP_STOP_S = 25
TERMINATION_GRACE_S = PRESTOP_SLEEP_S + 30 + GROUP_STOP_S
# The gateway (engine/gateway/drain.py) drains as long as the engines do, so a stream relayed through a gateway
# that rolls gets the time it would get from its group; after the drain it needs up to 5 s to flush cut streams
# and 5 s for uvicorn to close connections.
GATEWAY_STOP_S = 10


def drain_timeout_s(spec: MoEDeploymentSpec) -> float:
    """The engines' --drain-timeout: what spec.terminationGracePeriod leaves, else the engine's default 30 s."""
    if spec.termination_grace_seconds is None:
        return TERMINATION_GRACE_S - PRESTOP_SLEEP_S - GROUP_STOP_S
    return spec.termination_grace_seconds - PRESTOP_SLEEP_S - GROUP_STOP_S


def gateway_termination_grace_s(spec: MoEDeploymentSpec) -> int:
    """The gateway pod's grace period: its preStop sleep + its drain (the engines') + its stop."""
    return int(math.ceil(PRESTOP_SLEEP_S + drain_timeout_s(spec) + GATEWAY_STOP_S))


def render_statefulset(
    spec: MoEDeploymentSpec, role_name: str, replica: int, gang_backend: GangBackend | None = None
) -> Obj:
    """One group: nodesPerReplica pods started together (Parallel), updated only by the operator (OnDelete).

    Multi-node defaults come from pod_defaults.py, isolation from security.py, gang/topology fields from
    gang.py; the pod template overlays (pod_overlay.py: spec.podTemplate, then the role's) go on last."""
    role = spec.role(role_name)
    name = L.group_name(spec.name, role.name, replica)
    pod_labels = L.group_labels(spec.name, role.name, replica)
    tmp_volume, tmp_mount = security.tmp_volume()
    volumes: list[Obj] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod_defaults.shm_size(role)}},
        tmp_volume,
    ]
    mounts: list[Obj] = [{"name": "dshm", "mountPath": "/dev/shm"}, tmp_mount]
    model_volume = _model_volume(spec)
    if model_volume:
        volumes.append(model_volume)
        mounts.append({"name": "model", "mountPath": spec.model.mount_path, "readOnly": True})
    container: Obj = {
        "name": "engine",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["moefleet", "serve"],
        "args": engine_args(spec, role, replica),
        "env": _engine_env(spec, role, replica),
        "ports": [
            {"name": "http", "containerPort": L.ENGINE_HTTP_PORT, "protocol": "TCP"},
            {"name": "dist", "containerPort": L.ENGINE_MASTER_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(pod_defaults.default_requests(role), role.gpus_per_node),
        # Loading hundreds of GB of weights takes long: the startup probe is sized from spec.model.sizeGB.
        "startupProbe": pod_defaults.startup_probe(spec, L.HEALTH_PATH),
        "readinessProbe": {
            "httpGet": {"path": L.HEALTH_PATH, "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        # A hung engine (a stuck collective or kernel) still answers /health: liveness watches step progress.
        "livenessProbe": pod_defaults.liveness_probe(),
        "securityContext": security.container_security_context(),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        # Keep the crash reason: the operator copies it into the group-restart Event.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    secret_env = pod_defaults.model_secret_env(spec)
    if secret_env:
        container["envFrom"] = secret_env
    grace = spec.termination_grace_seconds
    pod_spec: Obj = {
        "readinessGates": [{"conditionType": L.GROUP_READY_CONDITION}],
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": security.pod_security_context(),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S if grace is None else int(grace),
        "affinity": gang.with_topology(_group_affinity(spec, role, replica), spec, role, replica),
    }
    if role.node_selector:
        pod_spec["nodeSelector"] = dict(role.node_selector)
    if role.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in role.tolerations]
    gang_labels, gang_annotations, scheduler = gang.pod_gang_fields(spec, role, replica, gang_backend)
    if scheduler:
        pod_spec["schedulerName"] = scheduler
    pod_metadata: Obj = {"labels": {**gang_labels, **pod_labels}}
    if gang_annotations:
        pod_metadata["annotations"] = gang_annotations
    template = apply_overlays(
        {"metadata": pod_metadata, "spec": pod_spec},
        tuple(o for o in (spec.pod_template, role.pod_template) if o),
    )
    workload_labels = {**gang.workload_labels(spec, gang_backend), **pod_labels}
    return _finish(
        spec,
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": name, "labels": workload_labels},
            "spec": {
                "replicas": role.nodes_per_replica,
                "serviceName": name,
                "podManagementPolicy": "Parallel",
                # The operator re-forms a whole group at once; a rolling update would mix versions in one
                # torch.distributed world.
                "updateStrategy": {"type": "OnDelete"},
                "selector": {"matchLabels": {L.GROUP_LABEL: name, **L.selector_labels(spec.name)}},
                "template": template,
            },
        },
    )


def render_headless_service(spec: MoEDeploymentSpec, role_name: str, replica: int) -> Obj:
    """Stable DNS for the group's pods; not-ready addresses are published so rank 0 resolves during startup."""
    name = L.group_name(spec.name, role_name, replica)
    return _finish(
        spec,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": L.group_labels(spec.name, role_name, replica)},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {L.GROUP_LABEL: name, **L.selector_labels(spec.name)},
                "ports": [
                    {"name": "http", "port": L.ENGINE_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                    {"name": "dist", "port": L.ENGINE_MASTER_PORT, "targetPort": "dist", "protocol": "TCP"},
                ],
            },
        },
    )


def render_ready_service(spec: MoEDeploymentSpec) -> Obj:
    """Headless Service over the *Ready* rank-0 pods of every role: the gateway's group discovery.

    One per deployment, not one per role: the gateway checks whether a group's rank-0 address is among the
    addresses the Service lists (engine/gateway/pool.py), and a pod's address is its own, so the other
    roles' addresses in the same list change nothing; it saves one object (one apply) per extra role."""
    return _finish(
        spec,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": L.ready_service_name(spec.name),
                "labels": L.common_labels(spec.name, L.COMPONENT_ENGINE),
            },
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": False,
                "selector": {
                    **L.selector_labels(spec.name),
                    L.COMPONENT: L.COMPONENT_ENGINE,
                    L.POD_INDEX: "0",
                },
                "ports": [
                    {"name": "http", "port": L.ENGINE_HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
                ],
            },
        },
    )


def render_role_pdb(spec: MoEDeploymentSpec, role_name: str) -> Obj:
    """At most one group of a role disrupted at a time (node drains, voluntary evictions).

    One budget over every engine pod of the role, maxUnavailable 1: an eviction is allowed only while every
    pod of the role is Ready. A pod is Ready only while its whole group is (the group-ready gate), so once
    one pod of group A is evicted, all of A counts as unavailable and no healthy pod of another group can
    be evicted until A is Ready again; A's own pods stay evictable (unhealthyPodEvictionPolicy AlwaysAllow),
    so a broken group never blocks a drain. This also bounds each group (one pod at a time). It replaces the
    former per-group budgets rather than sitting next to them: the eviction API refuses (HTTP 500) any pod
    that more than one PodDisruptionBudget selects.
    """
    return _finish(
        spec,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {
                "name": L.role_pdb_name(spec.name, role_name),
                "labels": {**L.common_labels(spec.name, L.COMPONENT_ENGINE), L.ROLE: role_name},
            },
            "spec": {
                "maxUnavailable": 1,
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
                "selector": {
                    "matchLabels": {
                        **L.selector_labels(spec.name),
                        L.COMPONENT: L.COMPONENT_ENGINE,
                        L.ROLE: role_name,
                    }
                },
            },
        },
    )


def gateway_config(spec: MoEDeploymentSpec) -> Obj:
    """The gateway's config file (schema shared with `moefleet gateway`): roles, their groups' rank-0 URLs and
    the Service that lists the ready ones (one for every role: render_ready_service)."""
    roles = {
        role.name: RoleEndpoints(
            service=f"{L.ready_service_name(spec.name)}.{spec.namespace}.svc",
            port=L.ENGINE_HTTP_PORT,
            groups=tuple(
                GroupEndpoint(
                    name=L.group_name(spec.name, role.name, replica),
                    url=f"http://{master_address(spec, role.name, replica)}:{L.ENGINE_HTTP_PORT}",
                    nodes=role.nodes_per_replica,
                    ranks=role.ranks_per_group,
                    draining=L.group_name(spec.name, role.name, replica) in spec.draining_groups,
                )
                for replica in range(role.replicas)
            ),
        )
        for role in spec.roles
    }
    return GatewayConfig(
        model=spec.model.served_name,
        mode="disaggregated" if spec.disaggregated else "mixed",
        routing_policy=spec.gateway.routing_policy,
        port=spec.gateway.port,
        health_path=L.HEALTH_PATH,
        drain_timeout_s=drain_timeout_s(spec),
        roles=roles,
        source=f"MoEDeployment {spec.namespace}/{spec.name}",
    ).to_dict()


def render_gateway_configmap(spec: MoEDeploymentSpec) -> Obj:
    text = json.dumps(gateway_config(spec), indent=2, sort_keys=True) + "\n"
    return _finish(
        spec,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": L.gateway_name(spec.name),
                "labels": L.common_labels(spec.name, L.COMPONENT_GATEWAY),
            },
            "data": {L.GATEWAY_CONFIG_FILE: text},
        },
    )


def render_gateway_deployment(spec: MoEDeploymentSpec) -> Obj:
    """The gateway; it re-reads its mounted config, so scaling groups does not restart it."""
    name = L.gateway_name(spec.name)
    pod_labels = L.common_labels(spec.name, L.COMPONENT_GATEWAY)
    pod_spec: Obj = {
        "containers": [
            {
                "name": "gateway",
                "image": spec.image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": ["moefleet", "gateway"],
                "args": [
                    "--config",
                    f"{L.GATEWAY_CONFIG_DIR}/{L.GATEWAY_CONFIG_FILE}",
                    "--host",
                    "0.0.0.0",
                    "--port",
                    str(spec.gateway.port),
                ],  # fmt: skip
                "ports": [{"name": "http", "containerPort": spec.gateway.port, "protocol": "TCP"}],
                "resources": _resources(spec.gateway.resources, None),
                "readinessProbe": {"httpGet": {"path": L.HEALTH_PATH, "port": "http"}, "periodSeconds": 5},
                "securityContext": security.container_security_context(),
                # Graceful drain: endpoint removal reaches the proxies during the sleep; SIGTERM then drains.
                "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
                "volumeMounts": [
                    {"name": "config", "mountPath": L.GATEWAY_CONFIG_DIR, "readOnly": True},
                    security.tmp_volume()[1],
                ],
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": name}}, security.tmp_volume()[0]],
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": security.pod_security_context(),
        "terminationGracePeriodSeconds": gateway_termination_grace_s(spec),
    }
    if spec.gateway.node_selector:
        pod_spec["nodeSelector"] = dict(spec.gateway.node_selector)
    if spec.gateway.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.gateway.tolerations]
    template = apply_overlays(
        {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        (spec.gateway.pod_template,) if spec.gateway.pod_template else (),
    )
    return _finish(
        spec,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": dict(pod_labels)},
            "spec": {
                "replicas": spec.gateway.replicas,
                "selector": {
                    "matchLabels": {**L.selector_labels(spec.name), L.COMPONENT: L.COMPONENT_GATEWAY}
                },
                "template": template,
            },
        },
    )


def render_gateway_service(spec: MoEDeploymentSpec) -> Obj:
    return _finish(
        spec,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": L.gateway_name(spec.name),
                "labels": L.common_labels(spec.name, L.COMPONENT_GATEWAY),
            },
            "spec": {
                "selector": {**L.selector_labels(spec.name), L.COMPONENT: L.COMPONENT_GATEWAY},
                "ports": [
                    {"name": "http", "port": spec.gateway.port, "targetPort": "http", "protocol": "TCP"}
                ],
            },
        },
    )


def _prom_label(key: str) -> str:
    """A Kubernetes label key as Prometheus' service discovery spells it (non-alphanumerics -> _)."""
    return "".join(c if c.isalnum() else "_" for c in key)


def render_pod_monitor(spec: MoEDeploymentSpec) -> Obj:
    """Prometheus Operator PodMonitor over the engine and gateway pods (only when that CRD exists)."""
    return _finish(
        spec,
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": spec.name, "labels": L.common_labels(spec.name, L.COMPONENT_ENGINE)},
            "spec": {
                "selector": {"matchLabels": L.selector_labels(spec.name)},
                "podMetricsEndpoints": [
                    {
                        "port": "http",
                        "path": L.METRICS_PATH,
                        "interval": "15s",
                        # deployment/role/group labels on every series: the EPLB trigger, dashboards and
                        # alerts select and aggregate by them.
                        "relabelings": [
                            {
                                "sourceLabels": [f"__meta_kubernetes_pod_label_{_prom_label(key)}"],
                                "targetLabel": target,
                            }
                            for key, target in (
                                (L.DEPLOYMENT, "deployment"),
                                (L.ROLE, "role"),
                                (L.GROUP_LABEL, "group"),
                                (L.POD_INDEX, "node_rank"),
                            )
                        ],
                    }
                ],
            },
        },
    )


def render_pod_groups(spec: MoEDeploymentSpec, gang_backend: GangBackend | None) -> list[Obj]:
    """One PodGroup per group when the gang scheduler needs one (gang.py); applied before the pods exist."""
    out = []
    for role in spec.roles:
        for replica in range(role.replicas):
            pod_group = gang.render_pod_group(spec, role, replica, gang_backend)
            if pod_group is not None:
                out.append(_finish(spec, pod_group))
    return out


def render_network_policies(
    spec: MoEDeploymentSpec, operator_namespace: str = "", metrics_namespace: str = ""
) -> list[Obj]:
    return [
        _finish(spec, obj)
        for obj in network_policy.render_network_policies(spec, operator_namespace, metrics_namespace)
    ]


def render_all(
    spec: MoEDeploymentSpec,
    pod_monitor_supported: bool,
    gang_backend: GangBackend | None = None,
    operator_namespace: str = "",
    metrics_namespace: str = "",
) -> list[Obj]:
    """Every desired child, in apply order (NetworkPolicies first, Services before the StatefulSets that
    name them). PodGroups are not in it (render_pod_groups: their kinds exist only with their scheduler)."""
    out: list[Obj] = render_network_policies(spec, operator_namespace, metrics_namespace)
    out.append(render_ready_service(spec))
    for role in spec.roles:
        out.append(render_role_pdb(spec, role.name))
        for replica in range(role.replicas):
            out.append(render_headless_service(spec, role.name, replica))
            out.append(render_statefulset(spec, role.name, replica, gang_backend))
    out.append(render_gateway_configmap(spec))
    out.append(render_gateway_service(spec))
    out.append(render_gateway_deployment(spec))
    if spec.pod_monitor and pod_monitor_supported:
        out.append(render_pod_monitor(spec))
    return out
