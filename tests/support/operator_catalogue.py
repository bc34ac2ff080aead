"""Operator test data: the invalid-MoEDeployment catalogue and the example manifests (unit + cluster tests)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "operator" / "data"
MANIFESTS = sorted((REPO / "manifests").glob("*.yaml"))


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON-merge-patch style deep merge: dicts merge, None deletes, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def invalid_cases() -> list[dict[str, Any]]:
    """[{name, body, field, api_field}] for every invalid MoEDeployment in the catalogue."""
    data = yaml.safe_load((DATA / "invalid_moedeployments.yaml").read_text())
    cases = []
    for case in data["cases"]:
        body = merge(data["base"], {"spec": case.get("spec", {}), "metadata": case.get("metadata", {})})
        cases.append(
            {
                "name": case["name"],
                "body": body,
                "field": case["field"],
                "api_field": case.get("api_field", case["field"]),
            }
        )
    return cases


def valid_base() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((DATA / "invalid_moedeployments.yaml").read_text())["base"])


def load_manifest(
    path: Path, namespace: str = "default", uid: str = "00000000-0000-0000-0000-000000000000"
) -> dict[str, Any]:
    """An example manifest as the API would return it (namespace, uid, generation filled in)."""
    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace=namespace, uid=uid, generation=1)
    return body
