"""The store protocol of an orderly group stop (distributed/shutdown.py) with a real TCPStore and a real
Watchdog thread in this process: a drain request reaches the front end's callback (plain, then forced),
an announced shutdown is seen by the watchdog, and the front end can count the ranks that left."""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist
from faults.conftest import wait_until
from moefleet.engine.distributed.shutdown import (
    announce_shutdown,
    drain_requested,
    mark_left,
    request_drain,
    wait_for_peers_to_leave,
)
from moefleet.engine.distributed.watchdog import Watchdog
from moefleet.engine.topology import Topology
from support.reference import free_port


def test_drain_relay_shutdown_announcement_and_leave_count():
    port = free_port()
    timeout = datetime.timedelta(seconds=10)
    store = dist.TCPStore("127.0.0.1", port, 3, True, timeout=timeout, wait_for_workers=False)
    launch = Topology(nnodes=3, node_rank=0, nproc_per_node=1, master_addr="127.0.0.1", master_port=port)
    # A long timeout: the silent peers (nobody runs ranks 1 and 2 here) must not look dead during the test.
    watchdog = Watchdog(launch, interval_s=0.05, timeout_s=60).start()
    heard: list[bool] = []
    watchdog.on_drain = heard.append
    try:
        assert drain_requested(store) is None
        time.sleep(0.2)
        assert heard == []  # nobody asked
        request_drain(store)  # e.g. node 2's SIGTERM
        wait_until(lambda: heard == [False], timeout=5)
        time.sleep(0.2)
        assert heard == [False]  # relayed once, not every interval
        request_drain(store, force=True)  # node 2's second SIGTERM
        wait_until(lambda: heard == [False, True], timeout=5)
        assert drain_requested(store) == "force"

        assert not watchdog.group_stopping
        announce_shutdown(store)
        wait_until(lambda: watchdog.group_stopping, timeout=5)

        started = time.monotonic()
        assert not wait_for_peers_to_leave(store, peers=2, timeout_s=0.3)  # nobody left yet: bounded wait
        assert 0.3 <= time.monotonic() - started < 2
        mark_left(store)
        mark_left(store)
        assert wait_for_peers_to_leave(store, peers=2, timeout_s=5)
    finally:
        watchdog.stop()
