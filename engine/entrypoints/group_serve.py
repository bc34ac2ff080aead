"""`moefleet serve` with several processes: one rank per GPU (or CPU worker), DP attention + EP MoE.

On every node the serve process runs local rank 0 itself and spawns local ranks 1..G-1 (like torchrun).
Global rank 0 (node 0, local rank 0) is the front end: the HTTP server over `DPFrontEndClient`, which places
each request on the least-loaded rank. Local rank 0 of every other node serves `/health` and `/metrics` for
its pod's probes (`WorkerNodeClient`). Every rank steps its `DPEngineLoop` until the front end sends
Shutdown. A group is all-or-nothing: if any rank dies, the watchdog makes the others exit (code 17) so the
operator restarts the group whole.

A SIGTERM is not a failure: on node 0 it drains the group (drain.py); on any other node it asks node 0 to
drain the group (distributed/shutdown.py), and that node's /health turns not-ready at once. Node 0 then
announces the shutdown, sends Shutdown to every rank and waits for all of them to leave before it takes the
rendezvous store down, so every rank exits 0.

Everything that can be checked before processes start is checked here (expert slots divisible by the ranks,
engine config, the HTTP port on node 0), so mistakes fail fast with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import threading
from typing import Any

from moefleet.engine.topology import Topology

logger = logging.getLogger(__name__)

CHILD_JOIN_TIMEOUT_S = 30.0
PEER_LEAVE_TIMEOUT_S = 20.0  # node 0 waits this long for the other ranks to leave before closing the store


def _set_cpu_threads(args: argparse.Namespace, launch: Topology) -> None:
    # Ranks on one CPU node share its cores; oversubscribed intra-op threads slow everyone down.
    if args.device == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.nproc_per_node))


def _run_rank(args: argparse.Namespace, launch: Topology, local_rank: int, sock: Any = None) -> None:
    """One rank: join the group, build this rank's engine, then serve HTTP (front end) or step."""
    from moefleet.engine.disaggregation.group_roles import attach_role, front_end_client
    from moefleet.engine.distributed import groups
    from moefleet.engine.distributed.engine_glue import DPEngineLoop, build_engine
    from moefleet.engine.distributed.request_router import RequestRouter
    from moefleet.engine.distributed.shutdown import mark_left, request_drain, wait_for_peers_to_leave
    from moefleet.engine.distributed.watchdog import Watchdog, fatal
    from moefleet.engine.entrypoints.dp_client import run_worker_rank
    from moefleet.engine.entrypoints.serve_command import engine_config, eplb_config, serve_http
    from moefleet.engine.entrypoints.worker_client import WorkerNodeClient
    from moefleet.engine.server.drain import Drain

    _set_cpu_threads(args, launch)
    config = engine_config(args)
    state = groups.init_distributed(
        launch.with_local_rank(local_rank), args.device, hf_config=config.hf_config
    )
    watchdog = Watchdog(state.topology).start()
    try:
        engine = build_engine(config, state, backend=args.moe_backend, eplb=eplb_config(args))
        loop = DPEngineLoop(engine, RequestRouter(state.cpu_group))
        agent = attach_role(loop, state, args)  # --role prefill/decode: this rank's KV transfer (else None)
        drain = Drain(args.drain_timeout)
        if state.rank == 0:
            watchdog.on_drain = drain.begin  # another node's SIGTERM drains the whole group
            serve_http(front_end_client(loop, state, agent), sock, args, drain=drain)
            # The client's shutdown announced it and sent Shutdown; keep the store up until everyone left.
            if not wait_for_peers_to_leave(state.store, state.world_size - 1, PEER_LEAVE_TIMEOUT_S):
                logger.warning("not every rank reported leaving within %s s", PEER_LEAVE_TIMEOUT_S)
        elif sock is not None:  # local rank 0 of another node: /health and /metrics for its pod
            store = state.store
            drain.listeners.append(lambda force: _in_thread(request_drain, store, force))
            client = WorkerNodeClient(loop, f"{launch.master_addr}", state)
            serve_http(client, sock, args, stop=client.finished, drain=drain)
            if not client.finished.is_set():  # the HTTP server died while the group runs: it cannot go on
                fatal(state.store, state.rank, f"node {launch.node_rank}'s HTTP server stopped unexpectedly")
            mark_left(state.store)
        else:
            run_worker_rank(loop, state)
            mark_left(state.store)
    finally:
        watchdog.stop()
        groups.shutdown(state)


def _in_thread(target: Any, *args: Any) -> None:
    # From a signal handler: a store call may block (its host gone); never block the event loop on it.
    threading.Thread(target=target, args=args, daemon=True).start()


def _child_main(args: argparse.Namespace, launch: Topology, local_rank: int) -> None:
    # Ctrl-C in a terminal (or a SIGTERM to the whole process group) reaches every process; children leave
    # through the front end's Shutdown after the drain (or the watchdog), never half-way through a collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper())
    _run_rank(args, launch, local_rank)


def check_group(args: argparse.Namespace, launch: Topology) -> None:
    """Checks that need the model's config.json but no process group (exit code 2 on failure)."""
    from moefleet.engine.cli import CommandError
    from moefleet.engine.entrypoints.serve_command import engine_config, eplb_config
    from moefleet.engine.eplb.expert_location import check_model_expert_slots

    config = engine_config(args)
    try:
        check_model_expert_slots(config.hf_config, launch.world_size, eplb_config(args).num_redundant_experts)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def run_group(args: argparse.Namespace, launch: Topology) -> int:
    """This node's part of a multi-process group; returns the exit code of local rank 0."""
    from moefleet.engine.cli import CommandError
    from moefleet.engine.entrypoints.serve_command import _check_device, bind_socket, print_weight_plan

    check_group(args, launch)
    # Every node's local rank 0 listens: node 0 serves the API, the others /health and /metrics (probes).
    sock = bind_socket(args.host, args.port)
    try:
        _check_device(args.device)
        print_weight_plan(args, launch.world_size)
        context = multiprocessing.get_context("spawn")  # fork after torch/threads is unsafe
        children = [
            context.Process(
                target=_child_main, args=(args, launch, local_rank), name=f"moefleet-rank-l{local_rank}"
            )
            for local_rank in range(1, launch.nproc_per_node)
        ]
        for child in children:
            child.start()
        try:
            _run_rank(args, launch, 0, sock)
        except (ValueError, RuntimeError, ConnectionError, TimeoutError) as exc:
            raise CommandError(f"the serving group could not start: {exc}", "see docs/serving.md") from None
        finally:
            for child in children:
                child.join(CHILD_JOIN_TIMEOUT_S)
                if child.is_alive():  # it missed Shutdown (e.g. the group broke): do not leave it behind
                    logger.warning("rank process %s did not exit; killing it", child.name)
                    child.kill()  # it ignores SIGTERM
                    child.join(5)
    finally:
        sock.close()
    return 0
