"""Scale: 50 MoEDeployments on 200 fake GPU nodes converge; then a quiet period with zero operator writes.

Prints the time to converge and the Kubernetes API requests the operator made (counted in kube.py and read
from its metrics endpoint) per MoEDeployment (at most 20 to converge, none in a quiet period);
docs/operator.md records the numbers. The 200-deployment / 1,000-node variant is a benchmark, not run in CI
(MOEFLEET_SCALE_BENCHMARK=1); docs/benchmarks.md records it.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from support.controlplane import LARGE_CLUSTER_ENV
from support.operator_cluster import OperatorProcess, is_ready, list_items

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

NODES = 200
DEPLOYMENTS = 50
RESYNC_SECONDS = 3.0
QUIET_SECONDS = 12.0
# Issue 17's budget: 20 per deployment. Measured 23.3 with issue 13's per-group NetworkPolicies and gang CRD
# lookups (22.3 on 2026-11-30 14:24: status 185, services 250, CRD GETs 31, events 50); brought under 20 by
# one ready-rank-0 Service per deployment instead of one per role, status batching (status.write_due), the
# CRDs watched instead of polled, and no Created Event for a new deployment's first pass.
MAX_REQUESTS_PER_DEPLOYMENT = 20
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


def _node_ready(node: dict) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def converge_and_stay_quiet(
    operator, cluster, namespace: str, nodes: int, deployments: int, timeout_s: float
):
    """Create `nodes` fake nodes and `deployments` MoEDeployments at once; wait until all are Ready; then a
    quiet period. Returns (requests to converge by (verb, resource), per deployment, quiet requests)."""
    t0 = time.monotonic()
    names: list[str] = []
    for batch in range(0, nodes, 200):  # one `kubectl apply` of 1,000 nodes outlasts kubectl's timeout
        count = min(200, nodes - batch)
        names += cluster.create_gpu_nodes(count, prefix=f"opscale{batch // 200}", labels=POOL, timeout_s=300)
    nodes_s = time.monotonic() - t0
    # Earlier tests' MoEDeployments (e.g. a module's long-lived one) would be this operator's objects too, and
    # their loops would count as quiet-period requests: the benchmark starts from a cluster without them
    # (nothing holds a finalizer, so they go at once).
    items = cluster.api_get("/apis/moefleet.ai/v1alpha1/moedeployments")["items"]
    for item in items:
        if item["metadata"]["namespace"] != namespace:
            cluster.kubectl("delete", "moedeployment", item["metadata"]["name"], "-n",
                            item["metadata"]["namespace"], "--wait=false", "--ignore-not-found")  # fmt: skip
    deadline = time.monotonic() + 120
    others = ["?"]
    while others and time.monotonic() < deadline:
        items = cluster.api_get("/apis/moefleet.ai/v1alpha1/moedeployments")["items"]
        others = [m["metadata"]["name"] for m in items if m["metadata"]["namespace"] != namespace]
        time.sleep(1)
    assert not others, f"MoEDeployments of earlier tests did not go: {others}"
    # A dedicated operator with a slower resync (the session one is stopped meanwhile: one operator at a time).
    operator.stop()
    scale_operator = OperatorProcess(
        cluster, operator.kubeconfig, operator.workdir, resync_seconds=RESYNC_SECONDS, crd_cache_seconds=60
    )
    try:
        scale_operator.start()
        start = time.monotonic()
        for first in range(0, deployments, 50):  # a loaded apiserver answers a smaller List in time
            items = [deployment(i) for i in range(first, min(first + 50, deployments))]
            cluster.kubectl(
                "apply", "-n", namespace, "-f", "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}), timeout=600,
            )  # fmt: skip
        path = f"/apis/moefleet.ai/v1alpha1/namespaces/{namespace}/moedeployments"
        ready: list[str] = []
        deadline = start + timeout_s
        progress_at = start
        while time.monotonic() < deadline:
            try:
                items = cluster.api_get(path)["items"]
            except (TimeoutError, OSError):  # a loaded apiserver: ask again
                continue
            ready = [m["metadata"]["name"] for m in items if is_ready(m)]
            if len(ready) == deployments:
                break
            if time.monotonic() - progress_at >= 60:  # what a benchmark cut short by its time limit reached
                progress_at = time.monotonic()
                done = sum(scale_operator.api_requests().values())
                try:  # why a run may stall: fake nodes that fell NotReady
                    fleet = list_items(cluster, "/api/v1/nodes", "moefleet.test/pool=opscale")
                    not_ready = sum(not _node_ready(n) for n in fleet)
                except (TimeoutError, OSError, RuntimeError):  # a loaded apiserver: not this minute
                    not_ready = -1
                print(
                    f"  {progress_at - start:.0f} s: {len(ready)}/{deployments} Ready, "
                    f"{done:.0f} operator API requests so far, {not_ready} nodes NotReady",
                    flush=True,
                )
            time.sleep(1)
        converge_s = time.monotonic() - start
        assert len(ready) == deployments, f"only {len(ready)} of {deployments} Ready after {converge_s:.0f}s"
        requests = scale_operator.api_requests()
        pods = list_items(
            cluster, f"/api/v1/namespaces/{namespace}/pods", "app.kubernetes.io/component=engine"
        )
        assert len(pods) == deployments * 3 and {p["spec"]["nodeName"] for p in pods} <= set(names)

        # Quiet period: nothing changes, so the operator must not make any request.
        writes_before = scale_operator.writes()
        time.sleep(QUIET_SECONDS)
        quiet = scale_operator.api_requests()
        writes_after = scale_operator.writes()
        quiet_requests = sum(quiet.values()) - sum(requests.values())
        total = sum(requests.values())
        # Closing readiness gates kwok's fake kubelet opened by itself: a real kubelet never opens them, so
        # these writes exist only on kwok (the operator counts them apart). The budget is on the rest.
        foreign = sum(n for (_, resource), n in requests.items() if resource == "pods/status:foreign-gate")
        per_deployment = (total - foreign) / deployments
        by_resource = {f"{verb} {resource}": n for (verb, resource), n in sorted(requests.items())}
        print(
            f"\n| nodes | MoEDeployments | engine pods | nodes Ready | all Ready | API requests (kwok-only) |"
            f" per deployment | quiet {QUIET_SECONDS:.0f} s |\n|---|---|---|---|---|---|---|---|\n"
            f"| {nodes} | {deployments} | {deployments * 3} | {nodes_s:.1f} s | {converge_s:.1f} s |"
            f" {total:.0f} ({foreign:.0f}) | {per_deployment:.1f} | {quiet_requests:.0f} requests |\n"
            f"requests by verb and resource: {', '.join(f'{k} {v:.0f}' for k, v in by_resource.items())}"
        )
        quiet_delta = {k: v - requests.get(k, 0) for k, v in quiet.items() if v != requests.get(k, 0)}
        assert writes_after == writes_before, f"operator wrote during a quiet period: {quiet_delta}"
        assert quiet_requests == 0, f"operator made requests during a quiet period: {quiet_delta}"
        # CRDs come from a watch (index moefleet_crds): polling them cost up to 8 GETs a minute, also when quiet.
        assert ("GET", "customresourcedefinitions") not in requests, by_resource
        return requests, per_deployment, quiet_requests
    finally:
        scale_operator.stop()
        operator.start()  # the session operator removes finalizers while the namespace is deleted
        try:
            cluster.delete_nodes("moefleet.test/pool=opscale")
        except TimeoutError:
            if nodes <= 200:
                raise
            # the benchmark's 1,000 nodes: a loaded API server may not answer the delete in time; the
            # session (and its throw-away cluster) ends with this benchmark anyway
            print(
                "  note: deleting the 1,000 fake nodes timed out (the cluster is discarded with the session)"
            )


def test_50_deployments_on_200_nodes_converge_in_at_most_20_requests_each_and_stay_quiet(
    operator, moefleet_chart, kube_namespace
):
    _, per_deployment, _ = converge_and_stay_quiet(
        operator, moefleet_chart, kube_namespace, NODES, DEPLOYMENTS, timeout_s=400
    )
    assert per_deployment <= MAX_REQUESTS_PER_DEPLOYMENT, f"{per_deployment:.1f} API requests per deployment"


@pytest.mark.skipif(
    os.environ.get("MOEFLEET_SCALE_BENCHMARK") != "1",
    reason="benchmark, not run in CI: MOEFLEET_SCALE_BENCHMARK=1 MOEFLEET_KWOK_LARGE_CLUSTER=1 pytest "
    "tests/operator/test_scale.py -k 1000 -s (MOEFLEET_SCALE_BENCHMARK_LIMIT_SECONDS caps the wait for "
    "convergence; progress is printed every minute; MOEFLEET_KWOK_LARGE_CLUSTER=1 slows the fake nodes' "
    "heartbeats so that 1,000 of them stay Ready on a small machine: tests/support/controlplane.py)",
)
@pytest.mark.timeout(3600)
def test_benchmark_200_deployments_on_1000_nodes(operator, moefleet_chart, kube_namespace):
    """The large variant (docs/benchmarks.md records its figures): same checks, 4x the deployments."""
    if os.environ.get(LARGE_CLUSTER_ENV) != "1":
        print(
            f"\n  note: without {LARGE_CLUSTER_ENV}=1 the 1,000 kwok nodes may flap NotReady on a small machine"
        )
    limit = float(os.environ.get("MOEFLEET_SCALE_BENCHMARK_LIMIT_SECONDS", "2400"))
    _, per_deployment, _ = converge_and_stay_quiet(
        operator, moefleet_chart, kube_namespace, 1000, 200, timeout_s=limit
    )
    assert per_deployment <= MAX_REQUESTS_PER_DEPLOYMENT
