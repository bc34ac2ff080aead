"""The kubelet of Nodes kwok does not manage, played by a test: it holds what kwok would do at once.

kwok makes a pod Ready the moment it is bound (readiness gates opened by itself) and finishes a graceful
deletion at once. A test that needs a pod Terminating, or a recreated pod still starting, for as long as it
says, puts the pods on nodes made here and lets `FakeKubelet` report their status:

- every pod on its nodes is reported Running; its containers turn ready at once while `admit` is set, else
  the pod stays starting (ContainersReady False) until the test sets it;
- Ready is ContainersReady and every readiness gate True, re-computed whenever a gate changes (as a real
  kubelet does; kwok never re-computes it);
- a pod being deleted stays Terminating until `finish_deletions` is set, then it is removed (grace 0).

`NodeHeartbeat` renews a node's Lease as its kubelet would, so the node controller keeps it Ready.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from support import kwok_nodes


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unmanaged_node(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """An 8-GPU Node kwok leaves alone (no kwok annotation), reported Ready."""
    node = kwok_nodes.gpu_node(name, labels=labels)
    del node["metadata"]["annotations"][kwok_nodes.KWOK_ANNOTATION]
    node["status"]["conditions"] = [
        {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now(), "lastTransitionTime": now()}
    ]  # fmt: skip
    return node


class NodeHeartbeat:
    """Renew a node's Lease (kube-node-lease) every few seconds, as its kubelet would, until stopped.

    Without it kube-controller-manager marks a node nobody heartbeats NotReady (and taints it unschedulable)
    a grace period (50 s) after it appears, which on a loaded CI machine can come before the scheduler has
    placed the group's pod there."""

    def __init__(self, cluster, node: str, period_s: float = 5.0) -> None:
        self.cluster, self.node, self.period_s = cluster, node, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{node}", daemon=True)

    def _lease(self) -> dict:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": stamp},
        }  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.cluster.apply(self._lease())
            except Exception:  # noqa: BLE001 - a missed beat is retried on the next period
                pass

    def __enter__(self) -> NodeHeartbeat:
        self.cluster.apply(self._lease())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeKubelet:
    """Report the status of every pod of `namespace` bound to `nodes` (see the module docstring)."""

    def __init__(self, cluster, namespace: str, nodes: list[str], period_s: float = 0.5) -> None:
        self.cluster, self.namespace, self.nodes, self.period_s = cluster, namespace, set(nodes), period_s
        self.admit = threading.Event()  # new pods' containers turn ready
        self.admit.set()
        self.finish_deletions = threading.Event()  # pods being deleted are removed
        self._started: set[str] = set()  # uids whose containers are ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self.errors: list[str] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as error:  # noqa: BLE001 - retried on the next period; kept for the report
                self.errors = [*self.errors[-4:], repr(error)]
            self._stop.wait(self.period_s)

    def sync(self) -> None:
        pods = self.cluster.api_get(f"/api/v1/namespaces/{self.namespace}/pods")["items"]
        for pod in (p for p in pods if (p.get("spec") or {}).get("nodeName") in self.nodes):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                if self.finish_deletions.is_set():
                    self._remove(meta)
                continue
            if self.admit.is_set():
                self._started.add(meta["uid"])
            self._report(pod, meta["uid"] in self._started)

    def _remove(self, meta: dict) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}  # fmt: skip
        self.cluster.kubectl(
            "delete", "--raw", f"/api/v1/namespaces/{self.namespace}/pods/{meta['name']}",
            "-f", "-", input=json.dumps(body), check=False,
        )  # fmt: skip

    def _report(self, pod: dict, started: bool) -> None:
        status = pod.get("status") or {}
        have = {c["type"]: c.get("status") for c in status.get("conditions") or []}
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        ready = started and all(have.get(g) == "True" for g in gates)
        want = {
            "PodScheduled": "True", "Initialized": "True",
            "ContainersReady": str(started), "Ready": str(ready),
        }  # fmt: skip
        if status.get("phase") == "Running" and all(have.get(t) == s for t, s in want.items()):
            return
        octets = int(pod["metadata"]["uid"].replace("-", "")[:4], 16)
        ip = status.get("podIP") or f"10.99.{octets // 256}.{octets % 256}"
        status = {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in want.items()],
            "containerStatuses": [
                {"name": c["name"], "ready": started, "started": True, "restartCount": 0, "image": c["image"],
                 "imageID": "", "state": {"running": {"startedAt": now()}}}
                for c in pod["spec"]["containers"]
            ],
        }  # fmt: skip
        # Strategic merge: conditions merge by type, so the readiness gates' conditions (the operator's) stay.
        self.cluster.kubectl(
            "patch", "pod", pod["metadata"]["name"], "-n", self.namespace, "--subresource=status",
            "--type=strategic", "-p", json.dumps({"status": status}), check=False,
        )  # fmt: skip

    def __enter__(self) -> FakeKubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def __exit__(self, *exc) -> None:
        self.stop()
