"""Process groups of one expert-parallel group, formed from a `Topology` (engine/topology.py: the launch
contract, its environment variables and the rank formula). The device group uses NCCL on CUDA and gloo on CPU;
a CPU gloo group always exists as well, for cheap control messages (DP step agreement, request hand-over)
that must not queue behind device work.

Start-up validation fails early with messages naming the values involved: too many processes for the
visible GPUs, nodes disagreeing on world size / model / moefleet version, master unreachable.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from moefleet.engine.topology import Topology

import moefleet

logger = logging.getLogger(__name__)

# Keys this module keeps in the rendezvous store.
WORLD_SIZE_KEY = "moefleet/world_size"
JOINED_KEY = "moefleet/joined"
ABORT_KEY = "moefleet/abort"  # a reason string: the group is going down (also read by the watchdog)


def check_visible_gpus(nproc_per_node: int, visible_gpus: int) -> None:
    """nproc_per_node processes each drive one GPU: refuse to start with fewer GPUs than processes."""
    if nproc_per_node > visible_gpus:
        raise ValueError(
            f"nproc_per_node ({nproc_per_node}) is larger than the number of visible GPUs ({visible_gpus}): "
            "lower nproc_per_node (gpusPerNode) or check CUDA_VISIBLE_DEVICES and the pod's GPU request"
        )


def check_experts_divisible(num_experts: int, world_size: int) -> None:
    if num_experts % world_size:
        raise ValueError(
            f"num_experts ({num_experts}) is not divisible by expert-parallel size ({world_size}): "
            "pick nnodes * nproc_per_node that divides the number of (physical) experts"
        )


def model_config_hash(hf_config: dict[str, Any]) -> str:
    """Short stable hash of a model's config.json contents (key order does not matter)."""
    blob = json.dumps(hf_config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What every rank of a group must agree on before any weight is loaded."""

    world_size: int
    model_hash: str
    version: str = moefleet.__version__


def check_fingerprints(fingerprints: list[Fingerprint]) -> None:
    """Raise naming the disagreeing field and the value on each side (rank 0 is the reference)."""
    reference = fingerprints[0]
    for rank, other in enumerate(fingerprints):
        for name, label in (
            ("world_size", "world size (nnodes * nproc_per_node)"),
            ("model_hash", "model config hash"),
            ("version", "moefleet version"),
        ):
            mine, theirs = getattr(reference, name), getattr(other, name)
            if mine != theirs:
                raise RuntimeError(
                    f"ranks disagree on {label}: rank 0 has {mine!r}, rank {rank} has {theirs!r}; "
                    "every node of a group must be started with the same model, image and group size"
                )


def wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Poll a TCP connection to the master until it answers; raise a readable error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"cannot reach the group master at {addr}:{port} within {timeout_s:g} s ({last_error}); "
                "check that node 0 of the group is running, that MASTER_ADDR/MASTER_PORT point at it "
                "(the headless Service of rank 0), and that no network policy blocks the port"
            )
        time.sleep(0.2)


@dataclass
class ProcessGroups:
    """The formed group: the process groups (and rendezvous store) of the `topology` it was formed from."""

    topology: Topology
    store: dist.TCPStore
    device_group: dist.ProcessGroup  # all_to_all / all_reduce of tensors on `device`
    cpu_group: dist.ProcessGroup  # gloo, control messages
    device: torch.device

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size


def init_distributed(
    launch: Topology,
    device: str = "cpu",
    hf_config: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
    collective_timeout_s: float = 300.0,
) -> ProcessGroups:
    """Form the group: rendezvous on the master's TCPStore, create the device and CPU groups, and check that
    every rank agrees on world size, model and version.

    `timeout_s` bounds reaching the master and all ranks joining; `collective_timeout_s` is the process
    group timeout, so a collective with a dead peer fails instead of hanging forever.
    """
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        check_visible_gpus(launch.nproc_per_node, torch.cuda.device_count())
        torch_device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(torch_device)
    is_master = launch.rank == 0
    if not is_master:
        wait_for_master(launch.master_addr, launch.master_port, timeout_s)
    try:
        store = dist.TCPStore(
            launch.master_addr,
            launch.master_port,
            launch.world_size,
            is_master,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    except Exception as exc:
        where = f"{launch.master_addr}:{launch.master_port}"
        if is_master:
            raise RuntimeError(
                f"rank 0 cannot serve the rendezvous store on {where} ({exc}); check that the port is free "
                "and MASTER_ADDR is an address of this node"
            ) from exc
        raise ConnectionError(
            f"rank {launch.rank} cannot join the rendezvous store on {where}: {exc}"
        ) from exc
    _wait_for_all_ranks(store, launch, timeout_s)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    dist.init_process_group(
        backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout
    )
    device_group = dist.group.WORLD
    assert isinstance(device_group, dist.ProcessGroup)
    cpu_group = device_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    assert isinstance(cpu_group, dist.ProcessGroup)
    fingerprint = Fingerprint(launch.world_size, model_config_hash(hf_config or {}))
    gathered: list[Any] = [None] * launch.world_size
    dist.all_gather_object(gathered, fingerprint, group=cpu_group)
    try:
        check_fingerprints(gathered)
    except RuntimeError:
        # Every rank sees the same fingerprints and fails here together: tear the groups down before the
        # error unwinds, or the process groups die in interpreter teardown (rank 0, the store's host, was
        # seen to abort with SIGABRT there instead of exiting with its error).
        dist.destroy_process_group()
        raise
    logger.info("rank %d/%d joined (%s, master %s:%d)", launch.rank, launch.world_size, backend,
                launch.master_addr, launch.master_port)  # fmt: skip
    return ProcessGroups(launch, store, device_group, cpu_group, torch_device)


def _wait_for_all_ranks(store: dist.TCPStore, launch: Topology, timeout_s: float) -> None:
    """Count arrivals in the store so a missing node gives a readable error instead of a hang.

    Each rank compares its world size with rank 0's first: a node started with another group size is caught
    here, before the process group's own rendezvous (which would only time out). The disagreeing rank posts
    the reason under ABORT_KEY so the waiting ranks fail with the same message.
    """
    if launch.rank == 0:
        store.set(WORLD_SIZE_KEY, str(launch.world_size))
    else:
        theirs = int(store.get(WORLD_SIZE_KEY))
        if theirs != launch.world_size:
            message = (
                f"ranks disagree on world size (nnodes * nproc_per_node): rank 0 has {theirs}, rank "
                f"{launch.rank} (node {launch.node_rank}) has {launch.world_size}; start every node of the group "
                "with the same nnodes and nproc_per_node"
            )
            store.set(ABORT_KEY, message)
            raise RuntimeError(message)
    arrived = store.add(JOINED_KEY, 1)
    deadline = time.monotonic() + timeout_s
    while arrived < launch.world_size:
        if store.check([ABORT_KEY]):
            raise RuntimeError(store.get(ABORT_KEY).decode())
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"only {arrived} of {launch.world_size} ranks reached the master "
                f"{launch.master_addr}:{launch.master_port} within {timeout_s:g} s; check that all "
                f"{launch.nnodes} nodes started and agree on nnodes ({launch.nnodes}) and nproc_per_node "
                f"({launch.nproc_per_node})"
            )
        time.sleep(0.05)
        arrived = store.add(JOINED_KEY, 0)


TORN_DOWN_KEY = "moefleet/torn-down"  # ranks that have destroyed their process groups (not shutdown.LEFT_KEY)
LEAVE_WAIT_S = 10.0
# After every peer marked itself torn down it still runs its interpreter's exit (destructors of the store
# client and the process-group objects); rank 0 keeps the store up this much longer so that exit never finds
# the store gone (one CI run of 2026-12-01 still saw the SIGABRT with rank 0 leaving right after the marks).
EXIT_GRACE_S = 1.0


def shutdown(state: ProcessGroups | None = None) -> None:
    """Destroy the process groups (safe to call twice). With `state`, rank 0 - the host of the rendezvous
    store - leaves last: it waits (at most LEAVE_WAIT_S) until every other rank has torn its groups down, so
    no rank's teardown finds the store gone (seen as "terminate called without an active exception", a
    SIGABRT at exit, when rank 0 exited first)."""
    from moefleet.engine.distributed.shutdown import mark_left, wait_for_peers_to_leave

    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    if state is None or state.world_size == 1:
        return
    if state.rank == 0:
        if wait_for_peers_to_leave(state.store, state.world_size - 1, LEAVE_WAIT_S, key=TORN_DOWN_KEY):
            time.sleep(EXIT_GRACE_S)
    else:
        mark_left(state.store, key=TORN_DOWN_KEY)
