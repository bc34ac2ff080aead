"""Start-up validation and failure behaviour with real processes: readable errors instead of hangs."""

from __future__ import annotations

import datetime
import signal
import threading
import time

import pytest
import torch.distributed as dist
from moefleet.engine.distributed import groups
from moefleet.engine.distributed.watchdog import EXIT_CODE
from moefleet.engine.topology import Topology
from support.reference import free_port

pytestmark = [pytest.mark.timeout(90)]


@pytest.mark.multiprocess
def test_model_mismatch_names_both_sides(start_group):
    group = start_group("fingerprint", 1, 2, options={"differ": "model"})
    assert group.wait(timeout_s=60) == [3, 3]
    for rank in range(2):
        err = group.stderr(rank)
        assert "ranks disagree on model config hash: rank 0 has '" in err, err[-2000:]
        assert "rank 1 has '" in err


def test_world_size_mismatch_names_both_sides():
    """Two ranks meet at a real TCPStore (threads of this process): rank 1 believes the node runs 3
    processes, so world size 3 against rank 0's 2. Both fail with the same message, neither hangs."""
    port = free_port()
    rank0 = Topology(nnodes=1, nproc_per_node=2, local_rank=0, master_port=port)
    rank1 = Topology(nnodes=1, nproc_per_node=3, local_rank=1, master_port=port)
    timeout = datetime.timedelta(seconds=10)
    master = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timeout, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)
    errors: dict[int, str] = {}

    def join(store: dist.TCPStore, launch: Topology) -> None:
        try:
            groups._wait_for_all_ranks(store, launch, timeout_s=10)
        except RuntimeError as exc:
            errors[launch.rank] = str(exc)

    threads = [threading.Thread(target=join, args=args) for args in ((master, rank0), (client, rank1))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert time.monotonic() - started < 5
    assert sorted(errors) == [0, 1]
    for message in errors.values():
        assert "ranks disagree on world size" in message and "rank 0 has 2, rank 1 (node 0) has 3" in message


def test_master_unreachable_fails_within_timeout():
    port = free_port()  # nothing listens there
    launch = Topology(nnodes=2, node_rank=1, nproc_per_node=1, master_addr="127.0.0.1", master_port=port)
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        groups.init_distributed(launch, timeout_s=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 2.5, elapsed
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "within 1.5 s" in message and "MASTER_ADDR" in message


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "mode,nnodes,victim",
    [("sleep", 3, 2), ("sleep", 2, 0), ("collective", 2, 1)],
    ids=["idle-rank2-heartbeat", "idle-rank0-store-host", "in-allreduce"],
)
def test_dead_rank_makes_others_exit(start_group, mode, nnodes, victim):
    """One process per node; SIGKILL one rank, the survivors exit with the watchdog's line and code."""
    group = start_group(f"watchdog-{mode}", nnodes, 1)
    for rank, proc in enumerate(group.procs):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", (rank, line, group.wait(1), group.stderr(rank)[-2000:])
    group.procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = group.wait(timeout_s=20)
    survivors = [r for r in range(nnodes) if r != victim]
    elapsed = time.monotonic() - killed_at
    assert [codes[r] for r in survivors] == [EXIT_CODE] * len(survivors), [
        group.stderr(r)[-2000:] for r in survivors
    ]
    assert elapsed < 15, elapsed
    for rank in survivors:
        err = group.stderr(rank)
        assert "moefleet: rank" in err and "restart the group whole" in err, err[-2000:]
