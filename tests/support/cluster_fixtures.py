"""pytest fixtures for tests that need a real Kubernetes control plane or Prometheus.

Registered for the whole suite from tests/conftest.py (`pytest_plugins`), so tests/cluster/ and
tests/operator/ both get:

- `kube_cluster` (session): a started ControlPlane (kubeconfig, restricted_kubeconfig, api_url, env,
  kubectl(), helm(), create_gpu_nodes(), fail_pod(), create_namespace(), logs()). If the binaries are not
  built the fixture errors with "run `make cluster-bins` first" (it does not skip).
- `kube_namespace` (function): a fresh namespace in that cluster, deleted afterwards.
- `prometheus` (function): a factory `prometheus(targets=[...]) -> PrometheusServer`, stopped afterwards.

When a test using these fails, the tail of every component's log is attached to its report.

Tests marked `cluster` are run a second time when they fail (pytest-rerunfailures; the report counts each
rerun as `R`): they drive kube-controller-manager, the scheduler and kwok on a shared 2-core machine, where
a component can fall behind a test's deadline. A real defect fails both runs. MOEFLEET_CLUSTER_RERUNS=0 turns
the rerun off (to see a flake), another number sets the count.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from support import binaries
from support.controlplane import ControlPlane
from support.prometheus import PrometheusServer

_ns_counter = itertools.count()
CLUSTER_RERUNS_ENV = "MOEFLEET_CLUSTER_RERUNS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reruns = int(os.environ.get(CLUSTER_RERUNS_ENV, "1"))
    if reruns <= 0 or not config.pluginmanager.hasplugin("rerunfailures"):
        return
    for item in items:
        if item.get_closest_marker("cluster") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=reruns, reruns_delay=2))


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[ControlPlane]:
    try:
        plane = ControlPlane()
    except binaries.BinariesMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with plane:
        # Tests run kubectl/helm by name too.
        old_path = os.environ.get("PATH", "")
        os.environ["PATH"] = binaries.path_env(old_path)
        try:
            yield plane
        finally:
            os.environ["PATH"] = old_path


@pytest.fixture
def kube_namespace(kube_cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"t{next(_ns_counter)}-{base}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


class PrometheusFactory:
    """`factory(targets=[...], **PrometheusServer kwargs)` starts a server; all are stopped at teardown."""

    def __init__(self) -> None:
        self.servers: list[PrometheusServer] = []

    def __call__(self, targets: list[str] | None = None, **kw: Any) -> PrometheusServer:
        server = PrometheusServer(targets, **kw)
        self.servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def prometheus() -> Iterator[PrometheusFactory]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make cluster-bins` first.", pytrace=False)
    factory = PrometheusFactory()
    yield factory
    factory.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        _attach_logs(item, report)
    return report


def _attach_logs(item: pytest.Item, report: pytest.TestReport) -> None:
    funcargs = getattr(item, "funcargs", {})
    plane = funcargs.get("kube_cluster")
    if isinstance(plane, ControlPlane):
        report.sections.append(("control plane logs", plane.logs()))
    factory = funcargs.get("prometheus")
    if isinstance(factory, PrometheusFactory):
        for server in factory.servers:
            report.sections.append((f"prometheus log ({server.url})", server.logs()))
