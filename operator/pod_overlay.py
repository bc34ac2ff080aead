"""Pod template overlay: `spec.podTemplate`, `spec.roles.<role>.podTemplate` and `spec.gateway.podTemplate`.

An overlay is a partial pod template ({metadata: {labels, annotations}, spec: {...}}) merged onto the pod the
operator renders with Kubernetes' strategic-merge-patch rules (what `kubectl patch --type strategic` does):
- objects merge key by key; `null` deletes a key;
- lists with a patch merge key merge item by item on that key (containers and initContainers by `name`, env
  by `name`, volumes by `name`, volumeMounts by `mountPath`, ports by `containerPort`, imagePullSecrets by
  `name`, hostAliases by `ip`, topologySpreadConstraints by `topologyKey`, ...); an overlay item with a new
  key is appended, an item with a known key is merged into it;
- every other list (tolerations, envFrom, args, capabilities.add, nodeSelectorTerms, ...) is replaced
  whole, as Kubernetes does for lists without a merge key.
Patch directives (`$patch`, `$retainKeys`, `$setElementOrder/...`) are not supported and are refused.

Fields the operator owns are refused (`check_overlay`, and at admission by the CRD's CEL rules that mirror
it), naming the field: the group/deployment labels, the engine container's image/command/args/ports/probes,
its MOEFLEET_* and POD_* variables, the GPU resource, the operator's volumes, the readiness gates and the
termination grace period (spec.terminationGracePeriod). Everything else - securityContext, hostNetwork,
hostIPC, capabilities, RDMA resources, volumes and mounts, tolerations, nodeSelector, affinity,
priorityClassName, schedulerName, imagePullSecrets, env and envFrom, sidecars - is the user's.

Pure functions only (no API calls).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from moefleet.operator import labels as L

Obj = dict[str, Any]

# Patch merge keys of the pod spec's lists (k8s.io/api/core/v1 types.go `patchMergeKey`), by field name.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "readinessGates": "conditionType",
    "schedulingGates": "name",
}

# Label key prefixes the operator owns (children are found by them; the gateway routes by them).
OWNED_LABEL_PREFIXES = ("moefleet.ai/", "app.kubernetes.io/", "apps.kubernetes.io/")
# Container fields of the operator's main container (engine or gateway) the overlay may not set.
OWNED_CONTAINER_FIELDS = (
    "image",
    "command",
    "args",
    "ports",
    "startupProbe",
    "readinessProbe",
    "livenessProbe",
)
OWNED_ENV_PREFIXES = ("MOEFLEET_",)
OWNED_ENV_NAMES = ("POD_NAME", "POD_NAMESPACE", "POD_IP")
# Volumes the operator renders (the overlay may add others, not replace these).
OWNED_VOLUMES = ("dshm", "model", "tmp", "config")
MAIN_CONTAINERS = ("engine", "gateway")


class OverlayError(ValueError):
    """An overlay that touches an operator-owned field; `field` is the dotted path inside the overlay."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


def strategic_merge(base: Any, patch: Any, field_name: str = "") -> Any:
    """`patch` merged onto `base` (neither is modified) with strategic-merge-patch rules (module docstring)."""
    if isinstance(patch, Mapping) and isinstance(base, Mapping):
        out = copy.deepcopy(dict(base))
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field_name in MERGE_KEYS:
        return _merge_list(base, patch, MERGE_KEYS[field_name])
    return copy.deepcopy(patch)


def _merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = [copy.deepcopy(item) for item in base]
    index = {item.get(key): i for i, item in enumerate(out) if isinstance(item, Mapping)}
    for item in patch:
        if not isinstance(item, Mapping) or key not in item:
            raise OverlayError(key, f"every item of this list needs its merge key {key!r}")
        position = index.get(item[key])
        if position is None:
            index[item[key]] = len(out)
            out.append(copy.deepcopy(dict(item)))
        else:
            out[position] = strategic_merge(out[position], item)
    return out


def _reject_directives(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and key.startswith("$"):
                raise OverlayError(f"{path}.{key}", "patch directives are not supported; write the result")
            _reject_directives(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_directives(item, f"{path}[{i}]")


def check_overlay(overlay: Any, path: str) -> None:
    """Refuse an overlay that is malformed or sets a field the operator owns; the error names the field."""
    if not isinstance(overlay, Mapping):
        raise OverlayError(path, "must be an object like {metadata: {labels: ...}, spec: {...}}")
    unknown = set(overlay) - {"metadata", "spec"}
    if unknown:
        raise OverlayError(f"{path}.{sorted(unknown)[0]}", "only metadata and spec may be set")
    _reject_directives(overlay, path)
    metadata = overlay.get("metadata") or {}
    if not isinstance(metadata, Mapping) or set(metadata) - {"labels", "annotations"}:
        raise OverlayError(f"{path}.metadata", "only labels and annotations may be set")
    for part in ("labels", "annotations"):
        values = metadata.get(part) or {}
        if not isinstance(values, Mapping) or not all(isinstance(v, str) for v in values.values()):
            raise OverlayError(f"{path}.metadata.{part}", "must map strings to strings")
    for key in metadata.get("labels") or {}:
        if key.startswith(OWNED_LABEL_PREFIXES):
            raise OverlayError(
                f"{path}.metadata.labels[{key}]",
                f"labels under {', '.join(OWNED_LABEL_PREFIXES)} are the operator's (it selects pods by them)",
            )
    spec = overlay.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise OverlayError(f"{path}.spec", "must be an object (a partial PodSpec)")
    spec_path = f"{path}.spec"
    if "readinessGates" in spec:
        raise OverlayError(f"{spec_path}.readinessGates", "the operator owns the group-ready gate")
    if "terminationGracePeriodSeconds" in spec:
        raise OverlayError(
            f"{spec_path}.terminationGracePeriodSeconds", "set spec.terminationGracePeriod instead"
        )
    for kind in ("containers", "initContainers", "volumes", "imagePullSecrets"):
        items = spec.get(kind)
        if items is not None and (
            not isinstance(items, list) or not all(isinstance(i, Mapping) and i.get("name") for i in items)
        ):
            raise OverlayError(f"{spec_path}.{kind}", "must be a list of objects, each with a name")
    for volume in spec.get("volumes") or []:
        if volume["name"] in OWNED_VOLUMES:
            raise OverlayError(
                f"{spec_path}.volumes[{volume['name']}]",
                f"volume names {', '.join(OWNED_VOLUMES)} are the operator's; use another name",
            )
    for container in spec.get("containers") or []:
        _check_container(container, f"{spec_path}.containers[{container['name']}]")


def _check_container(container: Mapping[str, Any], path: str) -> None:
    if container["name"] in MAIN_CONTAINERS:
        for key in OWNED_CONTAINER_FIELDS:
            if key in container:
                raise OverlayError(f"{path}.{key}", "is rendered by the operator and cannot be overlaid")
    env = container.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, Mapping) and e.get("name") for e in env):
        raise OverlayError(f"{path}.env", "must be a list of objects, each with a name")
    for item in env:
        name = item["name"]
        if name.startswith(OWNED_ENV_PREFIXES) or name in OWNED_ENV_NAMES:
            raise OverlayError(
                f"{path}.env[{name}]",
                "MOEFLEET_* and POD_NAME/POD_NAMESPACE/POD_IP are set by the operator (rank, group, roles)",
            )
    for mount in container.get("volumeMounts") or []:
        if isinstance(mount, Mapping) and mount.get("name") in OWNED_VOLUMES:
            raise OverlayError(f"{path}.volumeMounts[{mount.get('mountPath')}]", "mounts an operator volume")
    resources = container.get("resources") or {}
    for part in ("limits", "requests"):
        if L.GPU_RESOURCE in ((resources.get(part) if isinstance(resources, Mapping) else None) or {}):
            raise OverlayError(
                f"{path}.resources.{part}[{L.GPU_RESOURCE}]",
                "set gpusPerNode instead (it sets the GPU limit)",
            )


def apply_overlays(pod_template: Obj, overlays: tuple[Mapping[str, Any], ...]) -> Obj:
    """The rendered pod template ({metadata, spec}) with each overlay merged on in order (global, then role).

    Overlays were checked by `check_overlay`; the security defaults the operator renders (allowPrivilegeEscalation
    false) give way when the overlay makes the container privileged (the API refuses both together)."""
    out = copy.deepcopy(pod_template)
    for overlay in overlays:
        if overlay:
            out = strategic_merge(out, overlay)
    for container in out.get("spec", {}).get("containers", []):
        security = container.get("securityContext") or {}
        if security.get("privileged") and security.get("allowPrivilegeEscalation") is False:
            del security["allowPrivilegeEscalation"]
    return out
