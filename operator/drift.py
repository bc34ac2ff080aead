"""Drift: did someone change a field the operator owns on a live child (e.g. `kubectl edit` of an env var)?

Pure. The spec-hash annotation only says which rendering the operator last applied; it cannot see a hand
edit. So the live object is compared with the rendered one on exactly the fields the rendered one sets:
fields the API server adds (defaults such as `imagePullPolicy` or `protocol`, status) are not the operator's
and are ignored, and an omitted zero value (`false`, `0`, `""`, `{}`, `[]`) equals a missing field, as the
API server omits them. Lists are compared item by item, so an added or removed item (an extra env var) is
drift. Resource quantities compare by value (`"0.5"` and `"500m"` are equal); other scalars by their text
(`8` and `"8"` are equal: the API returns quantities as strings).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moefleet.operator import labels as L

_IGNORED_TOP = ("apiVersion", "kind", "status")
_OWNED_METADATA = ("labels", "annotations")


def _is_zero(value: Any) -> bool:
    """Go's omitempty: the API server leaves these out of what it returns."""
    if value is None or value is False or value == "":
        return True
    if isinstance(value, dict | list):
        return not value
    return type(value) is int and value == 0


def _quantity(value: Any) -> Any:
    try:
        from kubernetes.utils.quantity import parse_quantity

        return parse_quantity(value)
    except (ValueError, TypeError, ImportError):
        return None


def _same_scalar(desired: Any, live: Any, path: str) -> bool:
    if _is_zero(desired) and _is_zero(live):
        return True
    if str(desired) == str(live):
        return True
    if ".resources." in path:
        want, got = _quantity(desired), _quantity(live)
        return want is not None and want == got
    return False


def _diff(desired: Any, live: Any, path: str, out: list[str]) -> None:
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            if not (_is_zero(live) and not desired):
                out.append(path)
            return
        for key, value in desired.items():
            _diff(value, live.get(key), f"{path}.{key}" if path else key, out)
    elif isinstance(desired, list):
        if not isinstance(live, list):
            if not (_is_zero(live) and not desired):
                out.append(path)
            return
        if len(desired) != len(live):
            out.append(f"{path} ({len(live)} items, want {len(desired)})")
            return
        for i, (want, got) in enumerate(zip(desired, live, strict=True)):
            _diff(want, got, f"{path}[{i}]", out)
    elif not _same_scalar(desired, live, path):
        out.append(path)


def drifted_fields(desired: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """Paths of fields the rendered object `desired` sets whose live value differs (empty: no drift).
    `live` is `observed.live_content(body)` of the object as the API returns it."""
    owned: dict[str, Any] = {k: v for k, v in desired.items() if k not in (*_IGNORED_TOP, "metadata")}
    metadata = desired.get("metadata") or {}
    owned["metadata"] = {k: metadata[k] for k in _OWNED_METADATA if k in metadata}
    annotations = owned["metadata"].get("annotations")
    if annotations and L.SPEC_HASH in annotations:  # compared separately (the planner's spec_hash)
        owned["metadata"]["annotations"] = {k: v for k, v in annotations.items() if k != L.SPEC_HASH}
    out: list[str] = []
    _diff(owned, live, "", out)
    return out
