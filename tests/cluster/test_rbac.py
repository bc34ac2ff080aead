"""The restricted identity gets exactly what RBAC grants it (RBAC authorizer is on)."""

from __future__ import annotations

import subprocess

import pytest
from support.controlplane import RESTRICTED_USER, CommandError, ControlPlane, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_restricted_user_is_denied_unless_a_role_allows(
    kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    restricted = kube_cluster.restricted_kubeconfig

    def as_restricted(*args: str) -> tuple[int, str]:
        proc = kube_cluster.kubectl(*args, "-n", kube_namespace, kubeconfig=restricted, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    # Before any binding: denied, and the apiserver says who was denied.
    rc, out = as_restricted("get", "pods")
    assert rc != 0 and "Forbidden" in out and f'User "{RESTRICTED_USER}"' in out, out

    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "restricted-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": RESTRICTED_USER}],
    }
    kube_cluster.apply(role, kube_namespace)
    kube_cluster.apply(binding, kube_namespace)

    # RBAC decisions follow the informer cache: allow a moment for the binding to land.
    wait_until(lambda: as_restricted("get", "pods")[0] == 0, 30, "the RoleBinding to take effect")
    rc, out = as_restricted("get", "secrets")
    assert rc != 0 and "Forbidden" in out, out
    rc, out = as_restricted("auth", "can-i", "delete", "pods")
    assert out.strip() == "no"
    rc, out = as_restricted("auth", "can-i", "list", "pods")
    assert rc == 0 and out.strip() == "yes"
    # The grant is namespaced: other namespaces stay closed.
    proc = kube_cluster.kubectl("get", "pods", "-n", "kube-system", kubeconfig=restricted, check=False)
    assert proc.returncode != 0 and "Forbidden" in proc.stderr


def test_failed_kubectl_error_carries_stderr(kube_cluster: ControlPlane) -> None:
    with pytest.raises(
        CommandError, match=r"`kubectl get pod no-such-pod -n default` exited 1: .*NotFound"
    ) as err:
        kube_cluster.kubectl("get", "pod", "no-such-pod", "-n", "default")
    assert isinstance(err.value, subprocess.CalledProcessError)  # callers may catch the standard type
