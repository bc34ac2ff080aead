"""The gateway's configuration: one schema, written by the operator (ConfigMap) and read by `moefleet gateway`.

Both sides import this module (no torch, no kubernetes), so the file the operator renders is always a file the
gateway accepts. The JSON keys are camelCase like the CRD's:

    {"model": "m", "mode": "mixed" | "disaggregated", "routingPolicy": "least-load", "port": 8000,
     "healthPath": "/health", "drainTimeoutSeconds": 30 (optional: on SIGTERM, how long requests in flight
     may still run; `moefleet gateway --drain-timeout` wins over it),
     "roles": {"<role>": {"service": "m-decode.ns.svc" | null, "port": 8000,
                          "groups": [{"name": "m-decode-0", "url": "http://...:8000", "nodes": 1, "ranks": 8,
                                      "draining": true (optional: no new requests)}]}}}

`service` is the role's headless Service, which lists only Ready rank-0 pods: the gateway routes to a group only
while that Service resolves to it (when the name resolves at all; outside a cluster health checks decide alone).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROUTING_POLICIES = ("least-load", "round-robin", "prefix-cache", "random")
MODES = ("mixed", "disaggregated")
ROLES = ("mixed", "prefill", "decode")
DEFAULT_HEALTH_PATH = "/health"


class GatewayConfigError(ValueError):
    """A config value the gateway cannot use; the message names the field and says what is expected."""


@dataclass(frozen=True)
class GroupEndpoint:
    """One engine group, reached at its rank-0 HTTP front end."""

    name: str
    url: str
    nodes: int = 1
    ranks: int = 1
    # Set by the operator's autoscaler before it removes the group: the gateway sends it no new requests
    # (its in-flight ones finish) while it stays in the file.
    draining: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "url": self.url, "nodes": self.nodes, "ranks": self.ranks}
        if self.draining:
            out["draining"] = True
        return out


@dataclass(frozen=True)
class RoleEndpoints:
    groups: tuple[GroupEndpoint, ...]
    service: str | None = None
    port: int = 8000

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "port": self.port, "groups": [g.to_dict() for g in self.groups]}


@dataclass(frozen=True)
class GatewayConfig:
    model: str | None
    roles: Mapping[str, RoleEndpoints]
    mode: str = "mixed"
    routing_policy: str = "least-load"
    port: int = 8000
    health_path: str = DEFAULT_HEALTH_PATH
    drain_timeout_s: float | None = None  # None: the gateway's default (30 s, as `moefleet serve`)
    # Not part of the file: where it came from, for error messages.
    source: str = field(default="config", compare=False)

    def __post_init__(self) -> None:
        _check_choice(self.mode, MODES, "mode", self.source)
        _check_choice(self.routing_policy, ROUTING_POLICIES, "routingPolicy", self.source)
        _check_port(self.port, "port", self.source)
        if self.drain_timeout_s is not None and not 0 <= self.drain_timeout_s <= 86400:
            raise GatewayConfigError(
                f"{self.source}: 'drainTimeoutSeconds' is {self.drain_timeout_s:g}; expected 0..86400 seconds"
            )
        for role in self.roles:
            _check_choice(role, ROLES, f"roles.{role}", self.source)
        if self.mode == "mixed" and set(self.roles) - {"mixed"}:
            raise GatewayConfigError(
                f"{self.source}: mode 'mixed' takes only the role 'mixed', got {sorted(self.roles)}; "
                "use mode 'disaggregated' for prefill/decode roles"
            )
        if self.mode == "disaggregated" and not {"prefill", "decode"} <= set(self.roles):
            raise GatewayConfigError(
                f"{self.source}: mode 'disaggregated' needs roles 'prefill' and 'decode', got {sorted(self.roles)}"
            )

    @property
    def serving_roles(self) -> tuple[str, ...]:
        """Roles whose groups answer requests end to end (see docs/gateway.md for disaggregated mode)."""
        return ("mixed",) if self.mode == "mixed" else ("decode",)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "mode": self.mode,
            "routingPolicy": self.routing_policy,
            "port": self.port,
            "healthPath": self.health_path,
            "roles": {name: role.to_dict() for name, role in self.roles.items()},
        }
        if self.drain_timeout_s is not None:
            out["drainTimeoutSeconds"] = self.drain_timeout_s
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> GatewayConfig:
        if not isinstance(data, Mapping):
            raise GatewayConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {"model", "mode", "routingPolicy", "port", "healthPath", "drainTimeoutSeconds", "roles"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GatewayConfigError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        roles_raw = data.get("roles")
        if not isinstance(roles_raw, Mapping) or not roles_raw:
            raise GatewayConfigError(f"{source}: 'roles' must be a non-empty object of role -> groups")
        roles = {str(name): _parse_role(value, f"roles.{name}", source) for name, value in roles_raw.items()}
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise GatewayConfigError(f"{source}: 'model' must be a string")
        health_path = data.get("healthPath", DEFAULT_HEALTH_PATH)
        if not isinstance(health_path, str) or not health_path.startswith("/"):
            raise GatewayConfigError(f"{source}: 'healthPath' must be a path starting with '/'")
        return cls(
            model=model,
            roles=roles,
            mode=str(data.get("mode", "mixed")),
            routing_policy=str(data.get("routingPolicy", "least-load")),
            port=_int(data.get("port", 8000), "port", source),
            health_path=health_path,
            drain_timeout_s=_seconds(data.get("drainTimeoutSeconds"), "drainTimeoutSeconds", source),
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> GatewayConfig:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise GatewayConfigError(f"cannot read the gateway config {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GatewayConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def mixed_config(
    backend_urls: list[str], routing_policy: str = "least-load", model: str | None = None
) -> GatewayConfig:
    """The config `moefleet gateway --backend URL ...` stands for: one mixed role, one group per URL."""
    groups = tuple(
        GroupEndpoint(name=f"backend-{index}", url=_check_url(url, f"--backend #{index + 1}", "command line"))
        for index, url in enumerate(backend_urls)
    )
    return GatewayConfig(
        model=model,
        roles={"mixed": RoleEndpoints(groups=groups)},
        routing_policy=routing_policy,
        source="command line",
    )


def _parse_role(value: Any, path: str, source: str) -> RoleEndpoints:
    if not isinstance(value, Mapping):
        raise GatewayConfigError(f"{source}: '{path}' must be an object with 'groups'")
    groups_raw = value.get("groups", [])
    if not isinstance(groups_raw, list):
        raise GatewayConfigError(f"{source}: '{path}.groups' must be a list")
    groups = []
    for index, group in enumerate(groups_raw):
        where = f"{path}.groups[{index}]"
        if not isinstance(group, Mapping) or not isinstance(group.get("url"), str):
            raise GatewayConfigError(f"{source}: '{where}' must be an object with a 'url' string")
        groups.append(
            GroupEndpoint(
                name=str(group.get("name", f"{path}-{index}")),
                url=_check_url(group["url"], f"{where}.url", source),
                nodes=_int(group.get("nodes", 1), f"{where}.nodes", source),
                ranks=_int(group.get("ranks", 1), f"{where}.ranks", source),
                draining=_bool(group.get("draining", False), f"{where}.draining", source),
            )
        )
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise GatewayConfigError(f"{source}: '{path}.groups' has duplicate names {names}")
    service = value.get("service")
    if service is not None and not isinstance(service, str):
        raise GatewayConfigError(f"{source}: '{path}.service' must be a host name or null")
    port = _int(value.get("port", 8000), f"{path}.port", source)
    _check_port(port, f"{path}.port", source)
    return RoleEndpoints(groups=tuple(groups), service=service, port=port)


def _check_choice(value: str, choices: tuple[str, ...], name: str, source: str) -> None:
    if value not in choices:
        raise GatewayConfigError(f"{source}: '{name}' is {value!r}; expected one of {list(choices)}")


def _check_port(port: int, name: str, source: str) -> None:
    if not 1 <= port <= 65535:
        raise GatewayConfigError(f"{source}: '{name}' is {port}; expected a port in 1..65535")


def _int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GatewayConfigError(f"{source}: '{name}' must be a non-negative integer, got {value!r}")
    return value


def _seconds(value: Any, name: str, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise GatewayConfigError(
            f"{source}: '{name}' must be a non-negative number of seconds, got {value!r}"
        )
    return float(value)


def _bool(value: Any, name: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise GatewayConfigError(f"{source}: '{name}' must be true or false, got {value!r}")
    return value


def _check_url(url: str, name: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewayConfigError(
            f"{source}: '{name}' is {url!r}; expected http://HOST:PORT of an engine group"
        )
    return url.rstrip("/")
