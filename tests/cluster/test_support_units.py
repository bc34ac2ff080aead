"""Fast checks of the cluster test support code that need no running cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import binaries, kwok_nodes
from support.controlplane import ControlPlane


def test_gpu_nodes_carry_gpus_labels_and_kwok_annotation() -> None:
    nodes = kwok_nodes.gpu_nodes(3, prefix="n", zones=("z1", "z2"), gpu_product="NVIDIA-H200")
    assert [n["metadata"]["name"] for n in nodes] == ["n-0", "n-1", "n-2"]
    assert [n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in nodes] == ["z1", "z2", "z1"]
    for node in nodes:
        assert node["metadata"]["annotations"][kwok_nodes.KWOK_ANNOTATION] == "fake"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["status"]["capacity"] == node["status"]["allocatable"]
        assert "taints" not in node["spec"]
    assert kwok_nodes.gpu_node("t", taint=True)["spec"]["taints"][0]["effect"] == "NoSchedule"


def test_gpu_nodes_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        kwok_nodes.gpu_nodes(0)
    with pytest.raises(ValueError, match="zones"):
        kwok_nodes.gpu_nodes(1, zones=())


def test_failed_pod_status_terminates_every_container() -> None:
    pod = {"spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "j"}]}}
    patch = kwok_nodes.failed_pod_status(pod, "boom", exit_code=3)["status"]
    assert patch["phase"] == "Failed"
    assert [s["name"] for s in patch["containerStatuses"]] == ["a", "b"]
    for status in patch["containerStatuses"]:
        assert status["state"]["terminated"]["exitCode"] == 3
        assert status["state"]["terminated"]["message"] == "boom"
    with pytest.raises(ValueError, match="no spec.containers"):
        kwok_nodes.failed_pod_status({"spec": {}}, "x")


def test_missing_binaries_say_run_make_cluster_bins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLEET_CACHE", str(tmp_path))
    assert binaries.cache_root() == tmp_path / "bin"
    assert "kubernetes/kube-apiserver" in binaries.missing()
    with pytest.raises(binaries.BinariesMissing, match="run `make cluster-bins` first"):
        ControlPlane()


def test_cache_dirs_are_versioned_and_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLEET_CACHE", str(tmp_path))
    dirs = binaries.bin_dirs()
    assert tmp_path / "bin" / f"kubernetes-{binaries.KUBERNETES_VERSION}-{binaries.RECIPE}" in dirs
    assert binaries.path_env("/usr/bin").split(":") == [str(d) for d in dirs] + ["/usr/bin"]
