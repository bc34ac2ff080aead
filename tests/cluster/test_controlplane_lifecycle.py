"""A ControlPlane starts every component, reports what failed, and leaves no process or directory behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from support.controlplane import ControlPlane, ControlPlaneError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_own_plane_starts_serves_and_tears_down() -> None:
    with ControlPlane() as plane:
        names = [c.name for c in plane.components]
        assert names == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
        pids = [c.process.pid for c in plane.components if c.process is not None]
        assert len(pids) == 5 and all(_alive(p) for p in pids)
        assert plane.kubectl_json("get", "namespace", "default")["status"]["phase"] == "Active"
        assert "===== kube-apiserver" in plane.logs()
        workdir = plane.workdir
        print(f"startup seconds: { {k: round(v, 1) for k, v in plane.startup_s.items()} }")
    assert not any(_alive(p) for p in pids)
    assert not workdir.exists()


def test_component_failing_at_start_is_named_with_its_log(tmp_path: Path) -> None:
    # Sabotage etcd: its data dir already exists as a regular file, so etcd exits at once.
    (tmp_path / "etcd").write_text("not a directory")
    with pytest.raises(
        ControlPlaneError, match=r"etcd exited with code \d+ during startup; log tail:\n.+"
    ) as err:
        with ControlPlane(workdir=tmp_path):
            pass
    assert "kube-apiserver" not in str(err.value)  # it stopped at the first broken component
    assert (tmp_path / "logs" / "etcd.log").read_text().strip()


def test_port_taken_before_bind_is_retried_with_fresh_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    from support import controlplane

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_port = controlplane.free_port
    handed_out: list[int] = []

    def flaky_free_port() -> int:
        # The first port asked for (kube-apiserver's) is already taken by someone else.
        port = taken if not handed_out else real_free_port()
        handed_out.append(port)
        return port

    monkeypatch.setattr(controlplane, "free_port", flaky_free_port)
    try:
        with ControlPlane() as plane:
            assert plane.api_port != taken
            assert plane.kubectl_json("get", "namespace", "default")["metadata"]["name"] == "default"
    finally:
        squatter.close()
    assert handed_out[0] == taken
