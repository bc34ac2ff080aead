"""Helpers for the operator's cluster tests (tests/operator/): the operator subprocess and API polling.

The operator runs as a `kopf run -m moefleet.operator` subprocess authenticated with a token of the chart's
ServiceAccount (TokenRequest API via `kubectl create token`), so the tests exercise the chart's RBAC.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from support.controlplane import ControlPlane, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "moefleet"
RELEASE = "moefleet"
SYSTEM_NAMESPACE = "moefleet-system"
SERVICE_ACCOUNT = "moefleet"  # the chart's full name for release "moefleet"
TEST_IMAGE = "ghcr.io/moefleet/moefleet:test"
POOL = {"moefleet.test/pool": "operator"}  # the label of the session's H100 nodes (conftest `pool`)
ENGINE = "app.kubernetes.io/component=engine"
FAST_RESTARTS = {"backoffBase": "1s", "backoffMax": "4s", "maxRestarts": 5, "window": "10m"}


def service_account_kubeconfig(cluster: ControlPlane, out: Path) -> Path:
    """A kubeconfig holding a TokenRequest token of the chart's ServiceAccount."""
    token = cluster.kubectl(
        "create", "token", SERVICE_ACCOUNT, "-n", SYSTEM_NAMESPACE, "--duration=6h"
    ).stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cluster_entry = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in cluster_entry:
        data = Path(cluster_entry.pop("certificate-authority")).read_bytes()
        cluster_entry["certificate-authority-data"] = base64.b64encode(data).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster_entry}],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": SERVICE_ACCOUNT}}],
        "current-context": "operator",
    }
    out.write_text(yaml.safe_dump(config))
    return out


class OperatorProcess:
    """`kopf run -m moefleet.operator` as the chart's ServiceAccount, with its metrics and health ports."""

    def __init__(
        self,
        cluster: ControlPlane,
        kubeconfig: Path,
        workdir: Path,
        resync_seconds: float,
        crd_cache_seconds: float = 1.0,  # tests install the PodMonitor CRD on the fly
    ) -> None:
        self.crd_cache_seconds = crd_cache_seconds
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.resync_seconds = resync_seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = workdir / "operator.log"
        self.extra_env: dict[str, str] = {}  # more MOEFLEET_OPERATOR_* settings for the next start()

    def start(self) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = {
            **self.cluster.env,
            "KUBECONFIG": str(self.kubeconfig),
            "MOEFLEET_OPERATOR_RESYNC_SECONDS": str(self.resync_seconds),
            "MOEFLEET_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "MOEFLEET_OPERATOR_DEFAULT_IMAGE": TEST_IMAGE,
            "MOEFLEET_OPERATOR_CRD_CACHE_SECONDS": str(self.crd_cache_seconds),
            # Derived admin tokens, as the chart sets it: the chart's RBAC grants no `get` on Secrets.
            "MOEFLEET_OPERATOR_ADMIN_KEY": "test-operator-admin-key",
            **self.extra_env,
        }
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== operator start #{self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "-m",
                "moefleet.operator",
                "--standalone",
                "--all-namespaces",
                f"--liveness=http://127.0.0.1:{self.health_port}/healthz",
            ],  # fmt: skip
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        wait_until(self.healthy, 60, "the operator's liveness endpoint", logs=self.logs)

    def restart(self, env: dict[str, str] | None = None) -> None:
        """Stop, then start with `env` as the extra MOEFLEET_OPERATOR_* settings (none: the defaults)."""
        self.stop()
        self.extra_env = dict(env or {})
        self.start()

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def logs(self, lines: int = 80) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api_requests(self) -> dict[tuple[str, str], float]:
        """moefleet_operator_api_requests_total by (verb, resource), from the metrics endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[tuple[str, str], float] = {}
        pattern = r'^moefleet_operator_api_requests_total\{resource="([^"]*)",verb="([^"]*)"\} (\S+)$'
        for resource, verb, value in re.findall(pattern, text, re.M):
            out[(verb, resource)] = float(value)
        return out

    def writes(self) -> float:
        return sum(n for (verb, _), n in self.api_requests().items() if verb != "GET")

    def wait_quiet(
        self, resource: str, verb: str | None = None, quiet_s: float = 4, timeout: float = 60
    ) -> None:
        """Wait until the operator made no request on `resource` (of `verb`: any) for `quiet_s` seconds.
        The request counters are process-wide: deployments left by earlier tests (their namespaces may take
        minutes to terminate under kwok) are still reconciled; a test that counts requests waits for them."""

        def counts() -> dict[tuple[str, str], float]:
            return {
                k: v
                for k, v in self.api_requests().items()
                if k[1] == resource and (verb is None or k[0] == verb)
            }

        def quiet() -> bool:
            before = counts()
            time.sleep(quiet_s)
            return counts() == before

        wait_until(quiet, timeout, f"no {verb or 'request'} on {resource} for {quiet_s:g}s", interval_s=0.5)


def small_moed(
    name: str,
    roles: dict[str, Any] | None = None,
    namespace: str | None = None,
    *,
    fast_restarts: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    """A MoEDeployment whose roles (default: prefill 1 group of 1 node, decode 1 group of 2 nodes, 8 GPUs
    each) and gateway select the operator test pool unless a role says otherwise; `fast_restarts`: a
    restart policy of seconds instead of the defaults' minutes."""
    if roles is None:
        roles = {
            "prefill": {"replicas": 1, "nodesPerReplica": 1, "gpusPerNode": 8},
            "decode": {"replicas": 1, "nodesPerReplica": 2, "gpusPerNode": 8},
        }
    for role in roles.values():
        role.setdefault("nodeSelector", POOL)
    restarts = {"restartPolicy": dict(FAST_RESTARTS)} if fast_restarts else {}
    return moed_body(name, roles, namespace, gateway={"nodeSelector": POOL}, **restarts, **spec)


def moed_body(name: str, roles: dict[str, Any], namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    """A MoEDeployment of the tiny model with these roles and more spec fields."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {
        "apiVersion": "moefleet.ai/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": metadata,
        "spec": {"model": {"path": "/models/tiny"}, "roles": roles, **spec},
    }


# The kinds a MoEDeployment owns, by the namespaced path to list them ({ns}: the namespace).
CHILD_PATHS = {
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "Pod": "/api/v1/namespaces/{ns}/pods",
}


def live_children(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """Every object labelled with MoEDeployment `name` (pods included) that is not being deleted, each with
    its `kind` set."""
    out = []
    for kind, path in CHILD_PATHS.items():
        for obj in list_items(cluster, path.format(ns=namespace), f"moefleet.ai/deployment={name}"):
            if not obj["metadata"].get("deletionTimestamp"):
                out.append({**obj, "kind": kind})
    return out


def live_engine_pods(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """The engine pods of MoEDeployment `name` that are not being deleted."""
    pods = list_items(
        cluster, f"/api/v1/namespaces/{namespace}/pods", f"moefleet.ai/deployment={name},{ENGINE}"
    )
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def get_moed(cluster: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return cluster.api_get(f"/apis/moefleet.ai/v1alpha1/namespaces/{namespace}/moedeployments/{name}")


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def is_ready(body: dict[str, Any]) -> bool:
    """Ready=True at the MoEDeployment's current generation."""
    return (
        body.get("status", {}).get("observedGeneration") == body["metadata"]["generation"]
        and condition(body, "Ready").get("status") == "True"
    )


def wait_ready(cluster: ControlPlane, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    """Wait for Ready=True at the current generation; returns the MoEDeployment."""
    state: dict[str, Any] = {}

    def ready() -> bool:
        state["body"] = get_moed(cluster, namespace, name)
        return is_ready(state["body"])

    try:
        wait_until(ready, timeout, f"MoEDeployment {namespace}/{name} Ready", interval_s=0.5)
    except TimeoutError as error:
        raise TimeoutError(f"{error}\nlast status: {state.get('body', {}).get('status')}") from None
    return state["body"]


def patch_spec(cluster: ControlPlane, namespace: str, name: str, spec: dict[str, Any]) -> None:
    """`kubectl patch moed --type=merge` of the MoEDeployment's spec."""
    patch = json.dumps({"spec": spec})
    cluster.kubectl("patch", "moed", name, "-n", namespace, "--type=merge", "-p", patch)


def list_items(cluster: ControlPlane, path: str, selector: str) -> list[dict[str, Any]]:
    return cluster.api_get(f"{path}?labelSelector={urllib.parse.quote(selector)}")["items"]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, interval_s=0.5)
