"""A real Kubernetes control plane from local processes: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (fake nodes), like kwokctl's binary runtime but without containers.

    with ControlPlane() as cp:
        cp.create_gpu_nodes(16)
        cp.kubectl("get", "nodes")

Every component listens on a free loopback port, so several planes (parallel test runs) coexist. Each
component's output goes to `<workdir>/logs/<component>.log`; `logs()` returns the tails for failure reports.
Teardown terminates each component's process group (SIGTERM, then SIGKILL) in reverse start order.

`PYTHONPATH=tests python -m support.controlplane` (what `make cluster` runs) keeps one running in the
foreground with the admin kubeconfig at `.cache/cluster/kubeconfig`; Ctrl-C tears it down.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

if __package__ in (None, ""):  # `python tests/support/controlplane.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import binaries, cluster_pki, kwok_nodes

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "10.64.0.1/12"  # kwok hands out pod IPs from here (room for scale tests)
RESTRICTED_USER = "restricted"


# A large fake cluster (the operator scale benchmark's 1,000 nodes) on a small machine: kwok renews each
# node's Lease every quarter of the lease duration (like a kubelet), i.e. every 10 s by default, 100 renewals
# a second for 1,000 nodes; on 2 busy cores they fall behind kube-controller-manager's 50 s grace period, the
# nodes flap NotReady and their pods go Ready=False. MOEFLEET_KWOK_LARGE_CLUSTER=1 slows the heartbeat
# (600 s leases: a renewal every 150 s per node), widens the grace period to match (900 s) and raises the
# controller manager's API rate limits (20 QPS by default) so it keeps up with hundreds of StatefulSets.
# Off by default: the other cluster tests keep the stock timings.
LARGE_CLUSTER_ENV = "MOEFLEET_KWOK_LARGE_CLUSTER"


def _large_cluster() -> bool:
    return os.environ.get(LARGE_CLUSTER_ENV) == "1"


def _kwok_lease_seconds() -> int:
    return 600 if _large_cluster() else 40


def _large_cluster_controller_flags() -> list[str]:
    if not _large_cluster():
        return []
    return ["--node-monitor-grace-period=900s", "--kube-api-qps=100", "--kube-api-burst=200"]


class ControlPlaneError(RuntimeError):
    """A component failed to start or become ready; the message carries the tail of its log."""


class CommandError(subprocess.CalledProcessError):
    """kubectl/helm failed; unlike CalledProcessError its message includes the command's stderr."""

    def __str__(self) -> str:
        args = self.cmd if isinstance(self.cmd, list) else [self.cmd]
        words = [Path(str(args[0])).name] + [
            str(a) for a in args[1:] if not str(a).startswith("--kubeconfig=")
        ]
        shown = " ".join(words)
        return f"`{shown}` exited {self.returncode}: {(self.stderr or '').strip()[-2000:]}"


def free_port() -> int:
    """A currently free loopback TCP port (the kernel picks it; tiny race until the component binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: TextIO | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        # A new session per component: teardown signals the whole group, children included.
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace_s)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None


def die_with_parent() -> None:
    # If the test process is killed outright (SIGKILL, OOM) teardown never runs; the kernel then sends the
    # component SIGTERM so no etcd/apiserver outlives its test run. (Tied to the thread that started it.)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _https_get(
    url: str, context: ssl.SSLContext, timeout: float = 2.0, method: str = "GET"
) -> tuple[int, str]:
    try:
        request = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(request, context=context, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok as local processes.

    Attributes once started: `kubeconfig` (admin, group system:masters), `restricted_kubeconfig` (user
    "restricted", no permissions beyond what RBAC bindings grant it), `api_url`, `env` (KUBECONFIG and a
    PATH with kubectl/helm), `workdir`.
    """

    def __init__(self, workdir: Path | None = None, *, start_timeout_s: float = 90.0) -> None:
        self.bins = binaries.require()
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="moefleet-cp-")) if workdir is None else workdir
        self.start_timeout_s = start_timeout_s
        self.components: list[Component] = []
        self.api_port = 0
        self.api_url = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.restricted_kubeconfig = self.workdir / "restricted.kubeconfig"
        self.env: dict[str, str] = {}
        self.startup_s: dict[str, float] = {}
        self._ready_checks: dict[str, tuple[float, Callable[[], bool]]] = {}

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ControlPlane:
        for attempt in range(2):
            try:
                self.start()
                return self
            except ControlPlaneError as exc:
                self._stop_components()
                # free_port() cannot reserve a port: another process may take it before the component
                # binds it. Rare, so one retry with fresh ports (and a fresh etcd data dir) suffices.
                if attempt == 0 and "address already in use" in str(exc):
                    shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
                    continue
                self.stop()
                raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component and wait until each is ready (raises ControlPlaneError with log tails)."""
        t0 = time.monotonic()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        ca = cluster_pki.make_ca(pki)
        serving = cluster_pki.make_cert(
            pki, ca, "apiserver", "kube-apiserver",
            server_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            server_ips=("127.0.0.1", SERVICE_IP),
        )  # fmt: skip
        admin = cluster_pki.make_cert(pki, ca, "admin", "admin", organizations=("system:masters",))
        restricted = cluster_pki.make_cert(
            pki, ca, RESTRICTED_USER, RESTRICTED_USER, organizations=("moefleet:restricted",)
        )
        # The apiserver's front-proxy (aggregation) identity; configuring it also gives the controller
        # manager and scheduler the request-header CA they look up at start (else they log errors forever).
        front_proxy = cluster_pki.make_cert(pki, ca, "front-proxy-client", "front-proxy-client")
        sa = cluster_pki.make_service_account_keys(pki)
        self.startup_s["pki"] = time.monotonic() - t0

        self.api_port = free_port()
        self.api_url = f"https://127.0.0.1:{self.api_port}"
        cluster_pki.write_kubeconfig(self.kubeconfig, self.api_url, ca.cert, admin, "admin")
        cluster_pki.write_kubeconfig(
            self.restricted_kubeconfig, self.api_url, ca.cert, restricted, RESTRICTED_USER
        )
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": binaries.path_env()}
        self.env.pop("HTTPS_PROXY", None)  # loopback only; a proxy would break client certs
        self.env.pop("https_proxy", None)

        self._ca_context = ssl.create_default_context(cafile=str(ca.cert))
        self._ca_context.load_cert_chain(str(admin.cert), str(admin.key))
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        # etcd
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._launch(
            "etcd",
            [
                str(self.bins["etcd"]),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",  # test data is throw-away; fsync dominates latency on a busy disk
                "--log-level=warn",
            ],
            lambda: _http_ok(f"{etcd_url}/health"),
        )

        # kube-apiserver
        self._launch(
            "kube-apiserver",
            [
                str(self.bins["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={ca.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                # The default endpoint reconciler refuses a loopback address for the `kubernetes` Service.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
            lambda: _status_ok(self.api_url + "/readyz", self._ca_context),
        )

        # kube-controller-manager (GC, StatefulSet, Deployment, ReplicaSet, endpoints, service accounts, ...)
        self._launch_controller(
            "kube-controller-manager",
            [
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={ca.cert}",
                f"--cluster-signing-cert-file={ca.cert}",
                f"--cluster-signing-key-file={ca.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",  # one instance; skips the lease wait at start
                "--controllers=*",
                "--v=1",
                *_large_cluster_controller_flags(),
            ],
            insecure,
        )
        self._launch_controller(
            "kube-scheduler",
            [f"--cert-dir={self.workdir / 'scheduler-certs'}", "--leader-elect=false", "--v=1"],
            insecure,
        )

        # kwok: fakes kubelets for nodes annotated kwok.x-k8s.io/node=fake, with its default stages
        # (node initialize + heartbeat; pods ready, complete (Job pods), delete).
        kwok_port = free_port()
        kwok_config = self.workdir / "kwok.yaml"
        kwok_config.write_text("")  # an empty config: no ~/.kwok/kwok.yaml leaks in; defaults apply
        self._launch(
            "kwok",
            [
                str(self.bins["kwok"]),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={kwok_config}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={kwok_nodes.KWOK_ANNOTATION}={kwok_nodes.KWOK_ANNOTATION_VALUE}",
                f"--node-lease-duration-seconds={_kwok_lease_seconds()}",
                f"--cidr={POD_CIDR}",
                "--node-ip=10.250.0.1",
                f"--server-address=127.0.0.1:{kwok_port}",
            ],
            lambda: _http_ok(f"http://127.0.0.1:{kwok_port}/healthz"),
            wait=False,
        )

        # The three clients of the apiserver start in parallel; wait for all of them.
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._await(name)

        # Pods are admitted only once the namespace's default ServiceAccount exists (created by the
        # controller manager); wait for it so the first test does not race it.
        self._wait(
            "kube-controller-manager",
            lambda: self._get_ok("/api/v1/namespaces/default/serviceaccounts/default"),
        )
        self.startup_s["total"] = time.monotonic() - t0

    def stop(self) -> None:
        """Terminate every component (reverse order) and remove the working directory if we made it."""
        self._stop_components()
        if self._own_workdir and os.environ.get("MOEFLEET_KEEP_CLUSTER_DIR") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_components(self) -> None:
        for comp in reversed(self.components):
            comp.stop()
        self.components.clear()

    # --------------------------------------------------------------------------------------------- helpers

    def _launch(self, name: str, argv: list[str], ready: Callable[[], bool], wait: bool = True) -> None:
        """Start a component; with `wait=False` the caller waits later (components that start in parallel)."""
        comp = Component(name, argv, self.workdir / "logs" / f"{name}.log")
        self.components.append(comp)
        self._ready_checks[name] = (time.monotonic(), ready)
        comp.start(self.env)
        if wait:
            self._await(name)

    def _launch_controller(self, name: str, flags: list[str], insecure: ssl.SSLContext) -> None:
        """kube-controller-manager / kube-scheduler: admin kubeconfig for everything, HTTPS health on a free
        loopback port; started without waiting (they start in parallel)."""
        port = free_port()
        self._launch(
            name,
            [
                str(self.bins[name]),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                *flags,
            ],
            lambda: _status_ok(f"https://127.0.0.1:{port}/healthz", insecure),
            wait=False,
        )

    def _await(self, name: str) -> None:
        started, ready = self._ready_checks[name]
        self._wait(name, ready)
        self.startup_s[name] = time.monotonic() - started

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        comp = next((c for c in self.components if c.name == name), None)
        while True:
            if comp is not None and comp.exited() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {comp.exited()} during startup; log tail:\n{tail(comp.log_path)}"
                )
            try:
                if ready():
                    return
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                log = tail(comp.log_path) if comp else ""
                raise ControlPlaneError(
                    f"{name} not ready after {self.start_timeout_s:.0f}s; log tail:\n{log}"
                )
            time.sleep(0.2)

    def _get_ok(self, path: str) -> bool:
        return _status_ok(self.api_url + path, self._ca_context)

    def api_get(self, path: str, method: str = "GET") -> Any:
        """Call an API path as admin (GET by default) and decode the JSON body (raises on non-2xx).

        A 429 (the apiserver's "storage is (re)initializing" while a watch cache is rebuilt, e.g. after a
        CRD is installed; its Retry-After is 1 s) is retried for up to 30 s, as client-go (kubectl) does."""
        deadline = time.monotonic() + 30
        while True:
            status, body = _https_get(self.api_url + path, self._ca_context, timeout=30, method=method)
            if status != 429 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if status // 100 != 2:
            raise ControlPlaneError(f"{method} {path} -> {status}: {body[:500]}")
        return json.loads(body)

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (admin unless `kubeconfig` is given); `check` raises with stderr on failure."""
        cmd = [str(self.bins["kubectl"]), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        return _run(cmd, self.env, check, timeout, input)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster (admin); `check` raises with stderr on failure."""
        cmd = [str(self.bins["helm"]), f"--kubeconfig={self.kubeconfig}", *args]
        helm_home = self.workdir / "helm"
        env = {
            **self.env,
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }
        return _run(cmd, env, check, timeout)

    def kubectl_json(self, *args: str, kubeconfig: Path | None = None) -> Any:
        """`kubectl <args> -o json`, decoded."""
        return json.loads(self.kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)

    def apply(self, obj: dict[str, Any], namespace: str | None = None) -> None:
        """kubectl apply one object (or a List) given as a dict, optionally into `namespace`."""
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=json.dumps(obj))

    def create_namespace(self, name: str, timeout_s: float = 30) -> str:
        """Create a namespace and wait for its default ServiceAccount (pods are refused before it exists)."""
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_until(
            lambda: self._get_ok(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            timeout_s,
            f"default ServiceAccount in namespace {name}",
        )
        return name

    def create_gpu_nodes(
        self, n: int = 16, *, prefix: str = "gpu-node", timeout_s: float = 120, **kw: Any
    ) -> list[str]:
        """Create `n` kwok-managed 8-GPU nodes (see kwok_nodes.gpu_node for options) and wait until Ready."""
        nodes = kwok_nodes.gpu_nodes(n, prefix=prefix, **kw)
        self.apply(kwok_nodes.node_list(nodes))
        names = [node["metadata"]["name"] for node in nodes]
        wanted = set(names)

        def all_ready() -> bool:
            items = self.api_get("/api/v1/nodes")["items"]
            ready = {
                it["metadata"]["name"]
                for it in items
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in it.get("status", {}).get("conditions", [])
                )
            }
            return wanted <= ready

        wait_until(all_ready, timeout_s, f"{n} kwok GPU nodes ({prefix}-*) Ready", logs=self.logs)
        return names

    def delete_nodes(self, label_selector: str) -> None:
        """Delete every node matching `label_selector` in one deletecollection call (kubectl deletes one by one)."""
        query = urllib.parse.urlencode({"labelSelector": label_selector})
        self.api_get(f"/api/v1/nodes?{query}", method="DELETE")

    def fail_pod(self, namespace: str, name: str, message: str, *, exit_code: int = 1) -> None:
        """Make a running pod fail as if its containers exited with `exit_code` and `message`."""
        pod = self.kubectl_json("get", "pod", "-n", namespace, name)
        patch = kwok_nodes.failed_pod_status(pod, message, exit_code=exit_code)
        self.kubectl(
            "patch",
            "pod",
            "-n",
            namespace,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(patch),
        )

    def logs(self, lines: int = 40) -> str:
        """The last `lines` of every component's log, one section per component."""
        logs_dir = self.workdir / "logs"
        paths = sorted(logs_dir.glob("*.log")) if logs_dir.exists() else []
        return "\n".join(f"===== {p.stem} (last {lines} lines of {p}) =====\n{tail(p, lines)}" for p in paths)


def _run(
    cmd: list[str], env: dict[str, str], check: bool, timeout: float, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run kubectl/helm; `check` raises CommandError (with stderr) on failure."""
    proc = subprocess.run(cmd, env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return int(resp.status) == 200


def _status_ok(url: str, context: ssl.SSLContext) -> bool:
    return _https_get(url, context)[0] == 200


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 0.25,
    logs: Callable[[], str] | None = None,
) -> None:
    """Poll `predicate` until true; on timeout raise TimeoutError naming `what` (plus component logs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except (OSError, ControlPlaneError, subprocess.CalledProcessError):
            pass
        if time.monotonic() > deadline:
            extra = f"\n{logs()}" if logs else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{extra}")
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    """Foreground plane for manual work: `make cluster`. Writes kubeconfigs under .cache/cluster/."""
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description="Run the moefleet test control plane in the foreground.")
    parser.add_argument(
        "--out", type=Path, default=repo / ".cache" / "cluster", help="where to write kubeconfigs"
    )
    parser.add_argument("--gpu-nodes", type=int, default=16, help="fake 8-GPU kwok nodes to create (0: none)")
    args = parser.parse_args(argv)
    try:
        plane = ControlPlane()
    except binaries.BinariesMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with plane:
        if args.gpu_nodes:
            plane.create_gpu_nodes(args.gpu_nodes)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(plane.kubeconfig, args.out / "kubeconfig")
        shutil.copy(plane.restricted_kubeconfig, args.out / "restricted.kubeconfig")
        print(f"control plane up in {plane.startup_s['total']:.1f}s at {plane.api_url}")
        print(f"  export KUBECONFIG={args.out / 'kubeconfig'}")
        print(f"  restricted identity (user {RESTRICTED_USER!r}): {args.out / 'restricted.kubeconfig'}")
        print(f"  export PATH={binaries.path_env('')}:$PATH")
        print(f"  component logs: {plane.workdir / 'logs'}")
        print("Ctrl-C stops it.", flush=True)
        while not stop["now"]:
            dead = [c.name for c in plane.components if c.exited() is not None]
            if dead:
                print(f"component(s) exited: {dead}\n{plane.logs()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    print("control plane stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
