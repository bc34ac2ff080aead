"""Every label, annotation and well-known name the operator reads or writes, in one place.

Children are found by labels (never by name patterns), so these keys are the operator's contract with the
cluster: changing one orphans the children created by an older operator.
"""

from __future__ import annotations

GROUP = "moefleet.ai"
VERSION = "v1alpha1"
PLURAL = "moedeployments"
KIND = "MoEDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

# Recommended Kubernetes labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
NAME = "app.kubernetes.io/name"  # always "moefleet"
INSTANCE = "app.kubernetes.io/instance"  # the MoEDeployment's name
COMPONENT = "app.kubernetes.io/component"  # "engine" or "gateway"
MANAGED_BY = "app.kubernetes.io/managed-by"  # MANAGED_BY_VALUE on everything the operator creates
MANAGED_BY_VALUE = "moefleet-operator"
APP_NAME_VALUE = "moefleet"

# moefleet labels.
DEPLOYMENT = "moefleet.ai/deployment"  # owning MoEDeployment's name (children are listed by it)
ROLE = "moefleet.ai/role"  # prefill | decode | mixed
REPLICA = "moefleet.ai/replica"  # group index within the role, "0", "1", ...
GROUP_LABEL = "moefleet.ai/group"  # "<deployment>-<role>-<replica>": the StatefulSet and its pods
# Set by the StatefulSet controller (Kubernetes >= 1.28) on every pod: its ordinal = the node rank.
POD_INDEX = "apps.kubernetes.io/pod-index"
# Set by the StatefulSet controller on every pod: the controller revision the pod was created from.
CONTROLLER_REVISION = "controller-revision-hash"

# Pod condition (readiness gate) the operator sets True on every pod of a Ready group: a pod is Ready (and
# listed by the role Service the gateway reads) only while its whole group is, so the gateway never routes
# to a group that is forming, restarting or missing a node.
GROUP_READY_CONDITION = "moefleet.ai/group-ready"
GATE_REASONS = ("GroupReady", "GroupNotReady")  # the reasons the operator writes on that condition

# Annotations.
# sha256 (16 hex) of the rendered object without this annotation: equal hash => no write (idempotent apply).
SPEC_HASH = "moefleet.ai/spec-hash"
# On the MoEDeployment: JSON {group: RFC 3339 start} of the groups the autoscaler drains before removing them
# (operator/group_drain.py); the gateway config marks them draining.
DRAINING_ANNOTATION = "moefleet.ai/draining"

COMPONENT_ENGINE = "engine"
COMPONENT_GATEWAY = "gateway"

# Names of Kubernetes things the operator renders.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery; used in manifests
PODMONITOR_CRD = "podmonitors.monitoring.coreos.com"
FIELD_MANAGER = "moefleet-operator"
EVENT_SOURCE = "moefleet-operator"

# Ports and paths of the programs in the image (the engine's and gateway's CLI contracts).
ENGINE_HTTP_PORT = 8000
ENGINE_MASTER_PORT = 29500  # torch.distributed rendezvous on node rank 0
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
GATEWAY_CONFIG_DIR = "/etc/moefleet/gateway"
GATEWAY_CONFIG_FILE = "config.json"


def selector_labels(deployment: str) -> dict[str, str]:
    """Labels every child of one MoEDeployment carries (and that select them)."""
    return {INSTANCE: deployment, DEPLOYMENT: deployment, MANAGED_BY: MANAGED_BY_VALUE}


def common_labels(deployment: str, component: str) -> dict[str, str]:
    """Labels on every child: recommended labels + the owning deployment."""
    return {NAME: APP_NAME_VALUE, COMPONENT: component, **selector_labels(deployment)}


def group_name(deployment: str, role: str, replica: int) -> str:
    """StatefulSet and headless Service name of one group (deterministic: restarts make no duplicates)."""
    return f"{deployment}-{role}-{replica}"


def group_labels(deployment: str, role: str, replica: int) -> dict[str, str]:
    return {
        **common_labels(deployment, COMPONENT_ENGINE),
        ROLE: role,
        REPLICA: str(replica),
        GROUP_LABEL: group_name(deployment, role, replica),
    }


def ready_service_name(deployment: str) -> str:
    """The headless Service over the Ready rank-0 pods of every role (the gateway's discovery)."""
    return f"{deployment}-ready"


def role_pdb_name(deployment: str, role: str) -> str:
    """The role's PodDisruptionBudget (one per role: at most one group of the role disrupted at a time)."""
    return f"{deployment}-{role}"


def gateway_name(deployment: str) -> str:
    return f"{deployment}-gateway"
