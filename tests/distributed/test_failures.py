"""Start-up validation and failure behaviour with real processes: readable errors instead of hangs."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from moefleet.engine.distributed import groups
from moefleet.engine.distributed.watchdog import EXIT_CODE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


def test_model_mismatch_names_both_sides(start_group):
    group = start_group("fingerprint", 1, 2, options={"differ": "model"})
    assert group.wait(timeout_s=60) == [3, 3]
    for rank in range(2):
        err = group.stderr(rank)
        assert "ranks disagree on model config hash: rank 0 has '" in err, err[-2000:]
        assert "rank 1 has '" in err


def test_world_size_mismatch_names_both_sides(start_group):
    # Rank 1 believes the node runs 3 processes: world size 3 against rank 0's 2.
    group = start_group("fingerprint", 1, 2, per_rank_env={1: {"MOEFLEET_NPROC_PER_NODE": "3"}})
    assert group.wait(timeout_s=60) == [3, 3]
    for rank in range(2):
        assert "rank 0 has 2, rank 1 (node 0) has 3" in group.stderr(rank), group.stderr(rank)[-2000:]


def test_master_unreachable_fails_within_timeout():
    port = free_port()  # nothing listens there
    launch = groups.LaunchConfig(
        nnodes=2, node_rank=1, nproc_per_node=1, master_addr="127.0.0.1", master_port=port
    )
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        groups.init_distributed(launch, timeout_s=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 2.5, elapsed
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "within 1.5 s" in message and "MASTER_ADDR" in message


@pytest.mark.parametrize(
    "mode,victim",
    [("sleep", 2), ("sleep", 0), ("collective", 1)],
    ids=["idle-rank2", "idle-rank0", "in-allreduce"],
)
def test_dead_rank_makes_others_exit(start_group, mode, victim):
    group = start_group(f"watchdog-{mode}", 3, 1)
    for rank, proc in enumerate(group.procs):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", (rank, line, group.wait(1), group.stderr(rank)[-2000:])
    group.procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = group.wait(timeout_s=20)
    survivors = [r for r in range(3) if r != victim]
    elapsed = time.monotonic() - killed_at
    assert [codes[r] for r in survivors] == [EXIT_CODE] * 2, [group.stderr(r)[-2000:] for r in survivors]
    assert elapsed < 15, elapsed
    for rank in survivors:
        err = group.stderr(rank)
        assert "moefleet: rank" in err and "restart the group whole" in err, err[-2000:]
