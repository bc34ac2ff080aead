"""A real Prometheus server on loopback for tests: free port, temporary storage, the test's scrape config.

with PrometheusServer(targets=["127.0.0.1:8123"], scrape_interval="1s") as prom:
    prom.wait_for('up{job="test"} == 1')
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from support import binaries
from support.controlplane import die_with_parent, free_port, tail


class PrometheusError(RuntimeError):
    """Prometheus failed to start or a query failed; carries the server's log tail."""


class PrometheusServer:
    """Runs `prometheus` with either `targets` (one static job named `job`) or full `scrape_configs`."""

    def __init__(
        self,
        targets: list[str] | None = None,
        *,
        scrape_configs: list[dict[str, Any]] | None = None,
        job: str = "test",
        scrape_interval: str = "1s",
        start_timeout_s: float = 60.0,
    ) -> None:
        if (targets is None) == (scrape_configs is None):
            raise ValueError("PrometheusServer: pass exactly one of `targets` or `scrape_configs`")
        found = shutil.which("prometheus")
        if found is None:
            raise binaries.BinariesMissing("prometheus is not installed: run `make cluster-bins` first.")
        self.binary = found
        if scrape_configs is None:
            scrape_configs = [{"job_name": job, "static_configs": [{"targets": list(targets or [])}]}]
        self.config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": scrape_configs,
        }
        self.start_timeout_s = start_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="moefleet-prom-"))
        self.log_path = self.workdir / "prometheus.log"
        self.port = 0
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log_path, "w") as log:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self._proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"prometheus not ready after {self.start_timeout_s:.0f}s:\n{tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; returns the `result` list (vector samples). Raises on a PromQL error."""
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = resp.json()
        if body.get("status") != "success":
            raise PrometheusError(f"query {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Poll `promql` until it returns at least one sample; returns the samples."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                targets = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
                raise TimeoutError(f"no data for {promql!r} after {timeout_s:.0f}s; targets: {targets}")
            time.sleep(0.5)

    def logs(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)
