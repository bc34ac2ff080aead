"""Fixtures for multi-process tests: start a group of worker.py processes on 127.0.0.1 (gloo, free port).

Ranks are laid out as nodes x processes per node through the same environment variables a pod gets, so
the rank formula and the node-level checks run for real. Every process is killed at teardown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support.reference import free_port

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]


class Group:
    """A started group of worker processes."""

    def __init__(self, procs: list[subprocess.Popen[str]], out_dir: Path):
        self.procs, self.out_dir = procs, out_dir
        self.outputs: dict[int, tuple[str, str]] = {}

    def wait(self, timeout_s: float) -> list[int | None]:
        """Wait for every process up to `timeout_s` in total; returns exit codes (None = still running)."""
        deadline = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for rank, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
            codes.append(proc.poll())
            if proc.poll() is not None and rank not in self.outputs:
                self.outputs[rank] = proc.communicate()
        return codes

    def stderr(self, rank: int) -> str:
        return self.outputs.get(rank, ("", ""))[1]

    def results(self) -> list[dict[str, Any]]:
        import torch

        return [
            torch.load(self.out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(len(self.procs))
        ]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def start_group(tmp_path: Path):
    started: list[Group] = []

    def start(
        scenario: str,
        nnodes: int,
        nproc_per_node: int,
        per_rank_env: dict[int, dict[str, str]] | None = None,
        options: dict[str, Any] | None = None,
    ) -> Group:
        port = free_port()
        procs = []
        for node in range(nnodes):
            for local in range(nproc_per_node):
                rank = node * nproc_per_node + local
                env = dict(os.environ)
                env.update(
                    MOEFLEET_NNODES=str(nnodes),
                    MOEFLEET_NODE_RANK=str(node),
                    MOEFLEET_NPROC_PER_NODE=str(nproc_per_node),
                    MOEFLEET_LOCAL_RANK=str(local),
                    MOEFLEET_MASTER_ADDR="127.0.0.1",
                    MOEFLEET_MASTER_PORT=str(port),
                    MOEFLEET_TEST_OPTIONS=json.dumps(options or {}),
                    OMP_NUM_THREADS="1",  # 2-core machine, several ranks
                    GLOO_SOCKET_IFNAME="lo",
                )
                env.update((per_rank_env or {}).get(rank, {}))
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), scenario, str(tmp_path)],
                        cwd=REPO,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
        group = Group(procs, tmp_path)
        started.append(group)
        return group

    yield start
    for group in started:
        group.kill()


@pytest.fixture(scope="session")
def worker_module() -> ModuleType:
    """worker.py imported in the test process, for its input generators and toy model."""
    spec = importlib.util.spec_from_file_location("moefleet_test_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
