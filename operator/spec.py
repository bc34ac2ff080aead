"""The MoEDeployment spec as typed, validated data, parsed from the custom resource's body.

The CRD's schema (crds/moefleet.ai_moedeployments.yaml) rejects most bad input at admission; `parse`
checks the same rules again so the operator never acts on a spec the API server did not validate (an old
CRD, a hand-edited object) and so the rules are unit-testable. Errors name the field and say what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moefleet.operator.labels import DRAINING_ANNOTATION, GPU_RESOURCE
from moefleet.operator.pod_overlay import OverlayError, check_overlay

ROLES_DISAGGREGATED = ("prefill", "decode")
ROLE_MIXED = "mixed"
ROUTING_POLICIES = ("least-load", "round-robin", "prefix-cache", "random")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
EPLB_MODES = ("operator", "engine", "off")
NAME_PATTERN_SECRET = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS subdomain name
MAX_NAME_LENGTH = 40  # "<name>-decode-<replica>" must stay a DNS label and fit StatefulSet pod labels
MAX_REPLICAS = 512
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SERVED_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
QUANTITY_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
LABEL_KEY_PATTERN = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
GANG_MODES = ("auto", "off")


class SpecError(ValueError):
    """A MoEDeployment spec the operator cannot act on; `field` is the dotted path (e.g. spec.eplb.threshold)."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


def parse_duration(value: Any, field_path: str) -> float:
    """'30s', '5m', '1h30m', '500ms' -> seconds."""
    if not isinstance(value, str) or not re.fullmatch(DURATION_PATTERN, value):
        raise SpecError(field_path, f"{value!r} is not a duration; write it like 30s, 5m, 1h30m or 500ms")
    return sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(value))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    path: str
    served_name: str
    num_experts: int | None = None
    claim_name: str | None = None  # PersistentVolumeClaim holding the checkpoint
    volume: Mapping[str, Any] | None = None  # any other Kubernetes volume source (hostPath, nfs, csi, ...)
    mount_path: str = "/models"
    size_gb: float | None = None  # checkpoint size: sizes the startup probe (pod_defaults.startup_probe)
    secret_ref: str | None = None  # a Secret whose keys become engine env (e.g. HF_TOKEN); never read


AUTOSCALING_METRICS = ("queue", "kvUsage", "ttftP90", "tokensPerSecond")


@dataclass(frozen=True, slots=True)
class AutoscalingSpec:
    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    tolerance: float = 0.1
    scale_up_stabilization_seconds: float = 0.0
    scale_down_stabilization_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class RoleSpec:
    name: str
    replicas: int = 1
    nodes_per_replica: int = 1
    gpus_per_node: int = 8
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    engine_args: tuple[str, ...] = ()
    autoscaling: AutoscalingSpec | None = None
    shm_size: str | None = None  # /dev/shm size (a quantity); default from gpusPerNode (pod_defaults.py)
    pod_template: Mapping[str, Any] | None = None  # overlay (pod_overlay.py), after spec.podTemplate
    topology_key: str | None = None  # a group's pods land in one domain of this node label (gang.py)

    @property
    def ranks_per_group(self) -> int:
        return self.nodes_per_replica * self.gpus_per_node


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    replicas: int = 1
    routing_policy: str = "least-load"
    port: int = 8000
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    pod_template: Mapping[str, Any] | None = None  # overlay of the gateway pod (pod_overlay.py)


@dataclass(frozen=True, slots=True)
class GangSpec:
    mode: str = "auto"  # auto: one gang per group when a gang scheduler's CRDs exist (gang.py); off: never
    queue_name: str | None = None  # Kueue LocalQueue; Kueue is used only when this is set


@dataclass(frozen=True, slots=True)
class NetworkPolicySpec:
    enabled: bool = True
    # NetworkPolicyPeers allowed to scrape the engines' HTTP port (default: the operator's setting).
    metrics_from: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class EplbSpec:
    enabled: bool = True
    redundant_experts: int = 0
    threshold: float = 0.8
    window_seconds: float = 300.0
    cooldown_seconds: float = 600.0
    interval_seconds: float = 30.0
    # operator: the operator's EPLB trigger rebalances from Prometheus; engine: the engine's own interval
    # (the operator only reports); off: neither.
    mode: str = "operator"


@dataclass(frozen=True, slots=True)
class RestartPolicySpec:
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 600.0
    max_restarts: int = 10
    window_seconds: float = 3600.0
    # A (re)forming group whose pods have not all started (image pull) is not restarted within this.
    startup_grace_seconds: float = 600.0


@dataclass(frozen=True, slots=True)
class MoEDeploymentSpec:
    name: str
    namespace: str
    uid: str
    generation: int
    model: ModelSpec
    image: str
    roles: tuple[RoleSpec, ...]
    image_pull_policy: str = "IfNotPresent"
    engine_args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    gateway: GatewaySpec = GatewaySpec()
    eplb: EplbSpec = EplbSpec()
    pod_monitor: bool = False
    restart_policy: RestartPolicySpec = RestartPolicySpec()
    # Groups the autoscaler is draining (metadata.annotations[moefleet.ai/draining], group_drain.py).
    draining_groups: frozenset[str] = frozenset()
    pod_template: Mapping[str, Any] | None = None  # overlay of every engine pod (pod_overlay.py)
    topology_key: str | None = None  # default of roles' topologyKey
    termination_grace_seconds: float | None = None  # None: render.TERMINATION_GRACE_S
    gang: GangSpec = GangSpec()
    network_policy: NetworkPolicySpec = NetworkPolicySpec()

    @property
    def disaggregated(self) -> bool:
        return self.roles[0].name != ROLE_MIXED

    def role(self, name: str) -> RoleSpec:
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(name)


def _int(obj: Mapping[str, Any], key: str, path: str, default: int, low: int, high: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path}.{key}", f"{value!r} must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise SpecError(f"{path}.{key}", f"{value} must be {bound}")
    return value


def _mapping(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}.{key}", f"must be an object, got {type(value).__name__}")
    return value


def _strings(obj: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{path}.{key}", "must be a list of strings (one command-line token each)")
    return tuple(value)


def _objects(obj: Mapping[str, Any], key: str, path: str) -> tuple[Mapping[str, Any], ...]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise SpecError(f"{path}.{key}", "must be a list of objects")
    return tuple(value)


def _check_resources(resources: Mapping[str, Any], path: str) -> None:
    for part in ("limits", "requests"):
        if GPU_RESOURCE in (resources.get(part) or {}):
            raise SpecError(
                f"{path}.{part}",
                f"do not set {GPU_RESOURCE} here; set gpusPerNode (it becomes the GPU limit)",
            )


def _parse_role(name: str, obj: Mapping[str, Any]) -> RoleSpec:
    path = f"spec.roles.{name}"
    if not isinstance(obj, Mapping):
        raise SpecError(path, "must be an object")
    resources = _mapping(obj, "resources", path)
    _check_resources(resources, f"{path}.resources")
    affinity = obj.get("affinity")
    return RoleSpec(
        name=name,
        replicas=_int(obj, "replicas", path, 1, 0, MAX_REPLICAS),
        nodes_per_replica=_int(obj, "nodesPerReplica", path, 1, 1, 1024),
        gpus_per_node=_int(obj, "gpusPerNode", path, 8, 1, 16),
        resources=resources,
        node_selector=_mapping(obj, "nodeSelector", path),
        tolerations=_objects(obj, "tolerations", path),
        affinity=affinity if affinity else None,
        engine_args=_strings(obj, "engineArgs", path),
        autoscaling=_parse_autoscaling(obj.get("autoscaling"), f"{path}.autoscaling"),
        shm_size=_quantity(obj, "shmSize", path),
        pod_template=_pod_template(obj, path),
        topology_key=_label_key(obj, "topologyKey", path),
    )


def _quantity(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not QUANTITY_PATTERN.fullmatch(value):
        raise SpecError(f"{path}.{key}", f"{value!r} must be a quantity like 32Gi or 512Mi")
    return value


def _label_key(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 316 or not LABEL_KEY_PATTERN.fullmatch(value):
        raise SpecError(
            f"{path}.{key}", f"{value!r} must be a node label key like topology.kubernetes.io/zone"
        )
    return value


def _pod_template(obj: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    overlay = obj.get("podTemplate")
    if overlay is None:
        return None
    try:
        check_overlay(overlay, f"{path}.podTemplate")
    except OverlayError as error:
        raise SpecError(error.field, str(error).split(": ", 1)[1]) from None
    return overlay


def _number(
    obj: Mapping[str, Any], key: str, path: str, default: float | None, low: float, high: float
) -> float:
    value = obj.get(key, default)
    if value is None:
        raise SpecError(f"{path}.{key}", "is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise SpecError(f"{path}.{key}", f"{value!r} must be a number in [{low:g}, {high:g}]")
    return float(value)


def _parse_autoscaling(obj: Any, path: str) -> AutoscalingSpec | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise SpecError(path, "must be an object")
    for key in ("minReplicas", "maxReplicas", "metric", "target"):
        if key not in obj:
            raise SpecError(f"{path}.{key}", "is required")
    low = _int(obj, "minReplicas", path, 0, 0, MAX_REPLICAS)
    high = _int(obj, "maxReplicas", path, 1, 1, MAX_REPLICAS)
    if low > high:
        raise SpecError(f"{path}.minReplicas", f"({low}) must be <= maxReplicas ({high})")
    metric = obj["metric"]
    if metric not in AUTOSCALING_METRICS:
        raise SpecError(f"{path}.metric", f"{metric!r} must be one of {', '.join(AUTOSCALING_METRICS)}")
    target = _number(obj, "target", path, None, 0.0, float("inf"))
    if target <= 0:
        raise SpecError(f"{path}.target", "must be > 0")
    return AutoscalingSpec(
        min_replicas=low,
        max_replicas=high,
        metric=metric,
        target=target,
        tolerance=_number(obj, "tolerance", path, 0.1, 0.0, 1.0),
        scale_up_stabilization_seconds=parse_duration(
            obj.get("scaleUpStabilization", "0s"), f"{path}.scaleUpStabilization"
        ),
        scale_down_stabilization_seconds=parse_duration(
            obj.get("scaleDownStabilization", "5m"), f"{path}.scaleDownStabilization"
        ),
    )


def _parse_roles(obj: Mapping[str, Any]) -> tuple[RoleSpec, ...]:
    present = [name for name in (*ROLES_DISAGGREGATED, ROLE_MIXED) if obj.get(name) is not None]
    if present == list(ROLES_DISAGGREGATED):
        return tuple(_parse_role(name, obj[name]) for name in ROLES_DISAGGREGATED)
    if present == [ROLE_MIXED]:
        return (_parse_role(ROLE_MIXED, obj[ROLE_MIXED]),)
    raise SpecError(
        "spec.roles",
        f"set either prefill and decode (disaggregated) or mixed alone; got {present or 'none'}",
    )


def _parse_model(obj: Mapping[str, Any], default_served_name: str) -> ModelSpec:
    path = "spec.model"
    model_path = obj.get("path")
    if not isinstance(model_path, str) or not model_path:
        raise SpecError(f"{path}.path", "is required: the checkpoint directory inside the container")
    served_name = obj.get("servedName") or default_served_name
    if not isinstance(served_name, str) or not SERVED_NAME_PATTERN.fullmatch(served_name):
        raise SpecError(
            f"{path}.servedName",
            f"{served_name!r} must be 1-128 characters of letters, digits and . _ : / - (starting alphanumeric)",
        )
    num_experts = obj.get("numExperts")
    if num_experts is not None:
        num_experts = _int(obj, "numExperts", path, 0, 1)
    pvc = obj.get("pvc")
    volume = obj.get("volume")
    if pvc and volume:
        raise SpecError(path, "set at most one of pvc and volume")
    claim_name = None
    if pvc:
        claim_name = pvc.get("claimName") if isinstance(pvc, Mapping) else None
        if not claim_name:
            raise SpecError(f"{path}.pvc.claimName", "is required when pvc is set")
    mount_path = obj.get("mountPath", "/models")
    size_gb = obj.get("sizeGB")
    if size_gb is not None:
        size_gb = _number(obj, "sizeGB", path, None, 0.0, 1e6)
        if size_gb <= 0:
            raise SpecError(f"{path}.sizeGB", "must be > 0 (the checkpoint's size in GB)")
    secret_ref = obj.get("secretRef")
    secret_name = None
    if secret_ref is not None:
        secret_name = secret_ref.get("name") if isinstance(secret_ref, Mapping) else None
        if not isinstance(secret_name, str) or not NAME_PATTERN_SECRET.fullmatch(secret_name):
            raise SpecError(f"{path}.secretRef.name", "is required: the name of a Secret in this namespace")
    if (pvc or volume) and not model_path.startswith(mount_path):
        raise SpecError(f"{path}.path", f"{model_path!r} must be inside mountPath {mount_path!r}")
    return ModelSpec(
        path=model_path,
        served_name=served_name,
        num_experts=num_experts,
        claim_name=claim_name,
        volume=volume or None,
        mount_path=mount_path,
        size_gb=size_gb,
        secret_ref=secret_name,
    )


def _parse_eplb(obj: Mapping[str, Any]) -> EplbSpec:
    path = "spec.eplb"
    threshold = obj.get("threshold", 0.8)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise SpecError(f"{path}.threshold", f"{threshold!r} must be a number in (0, 1]")
    durations = {}
    for key, default in (("window", "5m"), ("cooldown", "10m"), ("interval", "30s")):
        durations[key] = parse_duration(obj.get(key, default), f"{path}.{key}")
        if durations[key] <= 0:
            raise SpecError(f"{path}.{key}", "must be longer than 0s")
    mode = obj.get("mode", "operator")
    if mode not in EPLB_MODES:
        raise SpecError(f"{path}.mode", f"{mode!r} must be one of {', '.join(EPLB_MODES)}")
    if "mode" in obj and mode != "off" and not obj.get("enabled", True):
        raise SpecError(f"{path}.mode", "must be off (or left unset) when spec.eplb.enabled is false")
    return EplbSpec(
        enabled=bool(obj.get("enabled", True)),
        redundant_experts=_int(obj, "redundantExperts", path, 0, 0),
        threshold=float(threshold),
        window_seconds=durations["window"],
        cooldown_seconds=durations["cooldown"],
        interval_seconds=durations["interval"],
        mode=mode,
    )


def _parse_restart_policy(obj: Mapping[str, Any]) -> RestartPolicySpec:
    path = "spec.restartPolicy"
    base = parse_duration(obj.get("backoffBase", "30s"), f"{path}.backoffBase")
    maximum = parse_duration(obj.get("backoffMax", "10m"), f"{path}.backoffMax")
    window = parse_duration(obj.get("window", "1h"), f"{path}.window")
    if maximum < base:
        raise SpecError(f"{path}.backoffMax", f"({maximum:g}s) must be >= backoffBase ({base:g}s)")
    if window <= 0:
        raise SpecError(f"{path}.window", "must be longer than 0s")
    return RestartPolicySpec(
        backoff_base_seconds=base,
        backoff_max_seconds=maximum,
        max_restarts=_int(obj, "maxRestarts", path, 10, 1),
        window_seconds=window,
        startup_grace_seconds=parse_duration(obj.get("startupGrace", "10m"), f"{path}.startupGrace"),
    )


def _parse_gateway(obj: Mapping[str, Any]) -> GatewaySpec:
    path = "spec.gateway"
    policy = obj.get("routingPolicy", "least-load")
    if policy not in ROUTING_POLICIES:
        raise SpecError(f"{path}.routingPolicy", f"{policy!r} must be one of {', '.join(ROUTING_POLICIES)}")
    return GatewaySpec(
        replicas=_int(obj, "replicas", path, 1, 0, 64),
        routing_policy=policy,
        port=_int(obj, "port", path, 8000, 1, 65535),
        resources=_mapping(obj, "resources", path),
        node_selector=_mapping(obj, "nodeSelector", path),
        tolerations=_objects(obj, "tolerations", path),
        pod_template=_pod_template(obj, path),
    )


def _parse_gang(obj: Mapping[str, Any]) -> GangSpec:
    path = "spec.gangScheduling"
    mode = obj.get("mode", "auto")
    if mode not in GANG_MODES:
        raise SpecError(f"{path}.mode", f"{mode!r} must be one of {', '.join(GANG_MODES)}")
    queue = obj.get("queueName")
    if queue is not None and (not isinstance(queue, str) or not NAME_PATTERN_SECRET.fullmatch(queue)):
        raise SpecError(f"{path}.queueName", f"{queue!r} must be the name of a Kueue LocalQueue")
    return GangSpec(mode=mode, queue_name=queue)


def _parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicySpec:
    path = "spec.networkPolicy"
    metrics_from = obj.get("metricsFrom")
    return NetworkPolicySpec(
        enabled=bool(obj.get("enabled", True)),
        metrics_from=None if metrics_from is None else _objects(obj, "metricsFrom", path),
    )


def parse(body: Mapping[str, Any], default_image: str = "") -> MoEDeploymentSpec:
    """Parse and validate a MoEDeployment body (as the API returns it) into a MoEDeploymentSpec."""
    metadata = body.get("metadata") or {}
    name = metadata.get("name", "")
    if not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            "metadata.name",
            f"{name!r} must be a DNS label of at most {MAX_NAME_LENGTH} characters starting with a letter",
        )
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "is required")
    image = spec.get("image") or default_image
    if not image:
        raise SpecError("spec.image", "is required (no operator default image is configured)")
    pull_policy = spec.get("imagePullPolicy", "IfNotPresent")
    if pull_policy not in PULL_POLICIES:
        raise SpecError("spec.imagePullPolicy", f"{pull_policy!r} must be one of {', '.join(PULL_POLICIES)}")
    model = _parse_model(_mapping(spec, "model", "spec"), default_served_name=name)
    roles = _parse_roles(_mapping(spec, "roles", "spec"))
    eplb = _parse_eplb(_mapping(spec, "eplb", "spec"))
    if model.num_experts is not None:
        physical = model.num_experts + eplb.redundant_experts
        for role in roles:
            if physical % role.ranks_per_group:
                raise SpecError(
                    f"spec.roles.{role.name}",
                    f"numExperts + redundantExperts ({model.num_experts} + {eplb.redundant_experts} = "
                    f"{physical}) is not divisible by the group's ranks (nodesPerReplica "
                    f"{role.nodes_per_replica} x gpusPerNode {role.gpus_per_node} = {role.ranks_per_group}); "
                    "change redundantExperts or the group size",
                )
    monitoring = _mapping(spec, "monitoring", "spec")
    return MoEDeploymentSpec(
        name=name,
        namespace=metadata.get("namespace", "default"),
        uid=metadata.get("uid", ""),
        generation=int(metadata.get("generation", 0)),
        model=model,
        image=image,
        image_pull_policy=pull_policy,
        engine_args=_strings(spec, "engineArgs", "spec"),
        env=_objects(spec, "env", "spec"),
        roles=roles,
        gateway=_parse_gateway(_mapping(spec, "gateway", "spec")),
        eplb=eplb,
        pod_monitor=bool(monitoring.get("podMonitor", False)),
        restart_policy=_parse_restart_policy(_mapping(spec, "restartPolicy", "spec")),
        draining_groups=_draining(metadata),
        pod_template=_pod_template(spec, "spec"),
        topology_key=_label_key(spec, "topologyKey", "spec"),
        termination_grace_seconds=_grace(spec),
        gang=_parse_gang(_mapping(spec, "gangScheduling", "spec")),
        network_policy=_parse_network_policy(_mapping(spec, "networkPolicy", "spec")),
    )


def _draining(metadata: Mapping[str, Any]) -> frozenset[str]:
    """Group names in the draining annotation (written only by the operator; unreadable -> none)."""
    text = (metadata.get("annotations") or {}).get(DRAINING_ANNOTATION)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return frozenset()
    return frozenset(str(k) for k in value) if isinstance(value, dict) else frozenset()


# The engine's drain needs the preStop sleep (render.PRESTOP_SLEEP_S) + its drain timeout + the ordered stop.
MIN_TERMINATION_GRACE_S = 40.0


def _grace(spec: Mapping[str, Any]) -> float | None:
    if "terminationGracePeriod" not in spec:
        return None
    path = "spec.terminationGracePeriod"
    seconds = parse_duration(spec["terminationGracePeriod"], path)
    if not MIN_TERMINATION_GRACE_S <= seconds <= 86400:
        raise SpecError(path, f"({seconds:g}s) must be between {MIN_TERMINATION_GRACE_S:g}s and 24h")
    return seconds
