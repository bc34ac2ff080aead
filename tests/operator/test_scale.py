"""Scale: 50 MoEDeployments on 200 fake GPU nodes converge; then a quiet period with zero operator writes.

Prints the time to converge and the Kubernetes API requests the operator made (counted in kube.py and read
from its metrics endpoint); docs/operator.md records the numbers.
"""

from __future__ import annotations

import time

import pytest
from support.operator_cluster import OperatorProcess, is_ready, list_items

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

NODES = 200
DEPLOYMENTS = 50
RESYNC_SECONDS = 3.0
QUIET_SECONDS = 12.0
POOL = {"moefleet.test/pool": "opscale"}


def deployment(i: int) -> dict:
    return {
        "apiVersion": "moefleet.ai/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": f"moe-{i:02d}"},
        "spec": {
            "model": {"path": "/models/m", "numExperts": 64},
            "roles": {
                "prefill": {"replicas": 1, "nodesPerReplica": 1, "gpusPerNode": 8, "nodeSelector": POOL},
                "decode": {"replicas": 1, "nodesPerReplica": 2, "gpusPerNode": 8, "nodeSelector": POOL},
            },
            "gateway": {"nodeSelector": POOL},
        },
    }


def test_50_deployments_on_200_nodes_converge_and_stay_quiet(operator, moefleet_chart, kube_namespace):
    cluster = moefleet_chart
    t0 = time.monotonic()
    nodes = cluster.create_gpu_nodes(NODES, prefix="opscale", labels=POOL, timeout_s=300)
    nodes_s = time.monotonic() - t0
    # A dedicated operator with a slower resync (the session one is stopped meanwhile: one operator at a time).
    operator.stop()
    scale_operator = OperatorProcess(
        cluster, operator.kubeconfig, operator.workdir, resync_seconds=RESYNC_SECONDS, crd_cache_seconds=60
    )
    try:
        scale_operator.start()
        start = time.monotonic()
        cluster.apply(
            {"apiVersion": "v1", "kind": "List", "items": [deployment(i) for i in range(DEPLOYMENTS)]},
            kube_namespace,
        )
        path = f"/apis/moefleet.ai/v1alpha1/namespaces/{kube_namespace}/moedeployments"
        ready: list[str] = []
        deadline = start + 400
        while time.monotonic() < deadline:
            items = cluster.api_get(path)["items"]
            ready = [m["metadata"]["name"] for m in items if is_ready(m)]
            if len(ready) == DEPLOYMENTS:
                break
            time.sleep(1)
        converge_s = time.monotonic() - start
        assert len(ready) == DEPLOYMENTS, f"only {len(ready)} of {DEPLOYMENTS} Ready after {converge_s:.0f}s"
        requests = scale_operator.api_requests()
        pods = list_items(
            cluster, f"/api/v1/namespaces/{kube_namespace}/pods", "app.kubernetes.io/component=engine"
        )
        assert len(pods) == DEPLOYMENTS * 3 and {p["spec"]["nodeName"] for p in pods} <= set(nodes)

        # Quiet period: nothing changes, so the operator must not write anything.
        writes_before = scale_operator.writes()
        time.sleep(QUIET_SECONDS)
        quiet = scale_operator.api_requests()
        writes_after = scale_operator.writes()
        quiet_requests = sum(quiet.values()) - sum(requests.values())
        by_verb: dict[str, float] = {}
        for (verb, _), n in requests.items():
            by_verb[verb] = by_verb.get(verb, 0) + n
        print(
            f"\n{NODES} nodes Ready in {nodes_s:.1f}s; {DEPLOYMENTS} MoEDeployments ({DEPLOYMENTS * 3} engine pods, "
            f"{DEPLOYMENTS} gateways) Ready in {converge_s:.1f}s; operator API requests to converge: "
            f"{sum(requests.values()):.0f} ({', '.join(f'{v} {n:.0f}' for v, n in sorted(by_verb.items()))}); "
            f"{sum(requests.values()) / DEPLOYMENTS:.1f} per deployment; quiet {QUIET_SECONDS:.0f}s "
            f"(resync {RESYNC_SECONDS:.0f}s): {quiet_requests:.0f} requests, {writes_after - writes_before:.0f} writes"
        )
        quiet_delta = {k: v - requests.get(k, 0) for k, v in quiet.items() if v != requests.get(k, 0)}
        print(
            f"requests by (verb, resource) to converge: {dict(sorted(requests.items()))}; during quiet: {quiet_delta}"
        )
        assert writes_after == writes_before, f"operator wrote during a quiet period: {quiet_delta}"
    finally:
        scale_operator.stop()
        operator.start()  # the session operator removes finalizers while the namespace is deleted
        cluster.delete_nodes("moefleet.test/pool=opscale")
