"""NetworkPolicies of one MoEDeployment (pure renders; applied as children like the Services).

Ingress to engine pods is allowed only by one NetworkPolicy per group, named after the group (one more
apply per group, like its headless Service), selecting the group's pods:
- from the group's own pods, every port (torch.distributed rendezvous, the TCPStore with its abort key,
  NCCL's bootstrap and socket transports, which use ephemeral ports);
- on the HTTP port only: the deployment's gateway pods, the operator's pods (EPLB admin calls; its namespace
  from the operator's settings) and the metrics scrapers (spec.networkPolicy.metricsFrom, default the
  operator's Prometheus namespace setting);
- decode groups also from the deployment's prefill pods, every port (the KV cache transfer listens on an
  ephemeral port; the prefill side connects to it).
Everything else is dropped: another group's pods, another deployment's, other namespaces. Kubelet probes come
from the node and are not subject to pod NetworkPolicies in common CNIs. Egress is not restricted (engines
read models from storage; the gateway reaches the engines). hostNetwork pods are not isolated by any
NetworkPolicy (a CNI limit): an overlay that sets hostNetwork gives up this isolation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moefleet.operator import labels as L
from moefleet.operator.spec import MoEDeploymentSpec

Obj = dict[str, Any]
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
OPERATOR_POD_LABELS = {L.COMPONENT: "operator"}  # the chart's operator pod (in its own namespace)


def _namespace_peer(namespace: str, pod_labels: Mapping[str, str] | None = None) -> Obj:
    peer: Obj = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}
    if pod_labels:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return peer


def _policy(name: str, labels: Mapping[str, str], selector: Mapping[str, str], ingress: list[Obj]) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def render_network_policies(
    spec: MoEDeploymentSpec, operator_namespace: str = "", metrics_namespace: str = ""
) -> list[Obj]:
    """Unfinished objects (render.py adds namespace, owner and hash); [] when spec.networkPolicy is off."""
    if not spec.network_policy.enabled:
        return []
    engines = {**L.selector_labels(spec.name), L.COMPONENT: L.COMPONENT_ENGINE}
    gateway = {**L.selector_labels(spec.name), L.COMPONENT: L.COMPONENT_GATEWAY}
    http_from: list[Obj] = [{"podSelector": {"matchLabels": gateway}}]
    if operator_namespace:
        http_from.append(_namespace_peer(operator_namespace, OPERATOR_POD_LABELS))
    if spec.network_policy.metrics_from is not None:
        http_from.extend(dict(peer) for peer in spec.network_policy.metrics_from)
    elif metrics_namespace:
        http_from.append(_namespace_peer(metrics_namespace))
    http_rule = {"from": http_from, "ports": [{"protocol": "TCP", "port": L.ENGINE_HTTP_PORT}]}
    out = []
    for role in spec.roles:
        for replica in range(role.replicas):
            group = L.group_name(spec.name, role.name, replica)
            members = {**L.selector_labels(spec.name), L.GROUP_LABEL: group}
            ingress = [{"from": [{"podSelector": {"matchLabels": members}}]}, http_rule]
            if role.name == "decode":
                prefill = {**engines, L.ROLE: "prefill"}
                ingress.append({"from": [{"podSelector": {"matchLabels": prefill}}]})
            out.append(_policy(group, L.group_labels(spec.name, role.name, replica), members, ingress))
    return out
