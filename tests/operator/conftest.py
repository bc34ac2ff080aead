"""Operator cluster fixtures: the chart installed with helm, the operator run from this checkout as the
chart's ServiceAccount, and a pool of fake GPU nodes. Helpers live in support/operator_cluster.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.controlplane import ControlPlane, wait_until
from support.operator_cluster import (
    CHART,
    RELEASE,
    SYSTEM_NAMESPACE,
    OperatorProcess,
    service_account_kubeconfig,
)


@pytest.fixture(scope="session")
def moefleet_chart(kube_cluster: ControlPlane) -> Iterator[ControlPlane]:
    """The chart installed (CRD, ServiceAccount, RBAC, operator Deployment) into moefleet-system."""
    kube_cluster.helm(
        "install", RELEASE, str(CHART),
        "--namespace", SYSTEM_NAMESPACE, "--create-namespace",
        "--set", "image.tag=test", "--wait=false",
    )  # fmt: skip
    wait_until(
        lambda: kube_cluster.kubectl("get", "crd", "moedeployments.moefleet.ai", check=False).returncode == 0,
        30,
        "the MoEDeployment CRD",
    )
    kube_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/moedeployments.moefleet.ai", "--timeout=60s"
    )
    yield kube_cluster
    kube_cluster.helm("uninstall", RELEASE, "--namespace", SYSTEM_NAMESPACE, check=False)


@pytest.fixture(scope="session")
def operator(
    moefleet_chart: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator process for the session (tests may restart it)."""
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = service_account_kubeconfig(moefleet_chart, workdir / "operator.kubeconfig")
    process = OperatorProcess(moefleet_chart, kubeconfig, workdir, resync_seconds=1.0)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def gpu_pool(moefleet_chart: ControlPlane) -> dict[str, list[str]]:
    """Fake nodes for the operator tests: 24 H100 nodes and 16 H200 nodes (8 GPUs each)."""
    # The H100s also advertise the NVIDIA network operator's shared RDMA device (the DeepSeek example asks for it).
    rdma = {"rdma/rdma_shared_device_a": "1000"}
    h100 = moefleet_chart.create_gpu_nodes(24, prefix="op-h100", extra_resources=rdma)
    h200 = moefleet_chart.create_gpu_nodes(16, prefix="op-h200", gpu_product="NVIDIA-H200")
    return {"h100": h100, "h200": h200}


@pytest.fixture(scope="module")
def pool(gpu_pool: dict[str, list[str]], moefleet_chart: ControlPlane) -> dict[str, list[str]]:
    """The session's H100 nodes labelled as the operator pool (POOL: what small_moed selects)."""
    for node in gpu_pool["h100"]:
        moefleet_chart.kubectl("label", "node", node, "moefleet.test/pool=operator", "--overwrite")
    return gpu_pool


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    process = getattr(item, "funcargs", {}).get("operator")
    if report.failed and isinstance(process, OperatorProcess):
        report.sections.append(("operator log", process.logs(200)))


@pytest.fixture(autouse=True)
def operator_log_has_no_tracebacks(request: pytest.FixtureRequest) -> Iterator[None]:
    """A handler exception is swallowed by kopf (logged, retried): fail the test that caused one."""
    if "operator" not in request.fixturenames:
        yield
        return
    process: OperatorProcess = request.getfixturevalue("operator")
    start = process.log_path.stat().st_size if process.log_path.exists() else 0
    yield
    with open(process.log_path, errors="replace") as log:
        log.seek(start)
        new = log.read()
    assert "Traceback" not in new, (
        f"the operator logged an exception:\n{new[max(0, new.index('Traceback') - 2000) :][:6000]}"
    )
