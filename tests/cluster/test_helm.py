"""helm (pinned build) is on PATH and installs/uninstalls a chart into the test cluster."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import binaries
from support.controlplane import ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

CHART = """apiVersion: v2
name: probe
version: 0.1.0
kubeVersion: ">=1.30.0-0"
"""
TEMPLATE = """apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-probe
data:
  greeting: {{ .Values.greeting | quote }}
"""


def test_helm_and_kubectl_on_path(kube_cluster: ControlPlane) -> None:
    helm = shutil.which("helm")
    assert helm is not None and Path(helm).parent in binaries.bin_dirs()
    out = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"v{binaries.HELM_VERSION}"), out
    server = kube_cluster.kubectl_json("version")["serverVersion"]
    assert server["gitVersion"] == f"v{binaries.KUBERNETES_VERSION}"


def test_helm_installs_a_chart(kube_cluster: ControlPlane, kube_namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(CHART)
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(TEMPLATE)

    kube_cluster.helm("install", "p1", str(chart), "-n", kube_namespace, "--set", "greeting=moe", "--wait")
    cm = kube_cluster.kubectl_json("get", "configmap", "-n", kube_namespace, "p1-probe")
    assert cm["data"]["greeting"] == "moe"
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    kube_cluster.helm("uninstall", "p1", "-n", kube_namespace, "--wait")
    gone = kube_cluster.kubectl("get", "configmap", "-n", kube_namespace, "p1-probe", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
