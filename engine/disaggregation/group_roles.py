"""Prefill/decode roles for multi-process groups (`moefleet serve --nproc-per-node N --role prefill|decode`).

With DP attention every rank holds the KV of its own requests, so every rank has its own KV sender and
receiver (`PDRankAgent`, rank_agent.py), driven by its `DPEngineLoop` at step boundaries (`GroupPD`); ranks
announce their receiver in the group's rendezvous store (`moefleet/pd/kv/<rank>` = "<node rank> <host:port>").
The front end (`PDFrontEndClient`, rank 0) serves GET /v1/pd/bootstrap with every rank's receiver and hands
each transfer request to a rank inside the group exchange (the payload carries the `PDRequest`):
- decode: to the rank the gateway chose (`x-moefleet-dp-rank`, default 0: the rank whose receiver
  `kv_port` names), since the prefill side pushes the KV to that rank's receiver;
- prefill: to the least-loaded rank, as any request; that rank computes the prompt and pushes its KV.
Outcomes travel back with the rank's outputs (`RequestRejected` / `RequestFailed` for errors).

    agent = attach_rank_agent(loop, state, role, host)           # every rank, before serving
    client = PDFrontEndClient(loop, state, role, agent)          # rank 0: the HTTP server's engine client
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from typing import Any

from moefleet.engine.disaggregation.base import create_transfer
from moefleet.engine.disaggregation.rank_agent import PDRankAgent, PDRequest
from moefleet.engine.disaggregation.roles import current_pd_request
from moefleet.engine.distributed.engine_glue import DPEngineLoop, RequestFailed, RequestRejected
from moefleet.engine.distributed.request_router import AddRequest
from moefleet.engine.entrypoints.dp_client import DPFrontEndClient
from moefleet.engine.server.async_engine import NoRoomError, RequestRejectedError

STORE_KEY = "moefleet/pd/kv/{rank}"
ANNOUNCE_TIMEOUT_S = 300.0  # every rank announces its receiver right after loading its model


def advertised_host(host: str, node_rank: int, env: Any = os.environ) -> str | None:
    """The address this rank's KV receiver announces (pure but for the hostname lookup): the listen address
    when it is a concrete one; for a wildcard, 127.0.0.1 on node 0 (the gateway reaches node 0's ranks at the
    group's URL host anyway) and the pod IP (MOEFLEET_POD_IP / POD_IP, else this host's name) elsewhere."""
    if host not in ("0.0.0.0", "", "::"):
        return host
    if node_rank == 0:
        return "127.0.0.1"
    return env.get("MOEFLEET_POD_IP") or env.get("POD_IP") or socket.gethostbyname(socket.gethostname())


class GroupPD:
    """`DPEngineLoop.pd`: one rank's agent, its events turned into outputs that travel in the exchange."""

    def __init__(self, agent: PDRankAgent):
        self.agent = agent

    def add(self, request_id: str, prompt: list[int], params: Any, pd: PDRequest) -> list[Any]:
        return _as_outputs(self.agent.add(request_id, prompt, params, pd))

    def abort(self, request_id: str) -> bool:
        return self.agent.abort(request_id)

    def poll(self) -> list[Any]:
        return _as_outputs(self.agent.poll())

    def after_step(self) -> None:
        self.agent.start_sends()


def _as_outputs(events: list[tuple[str, Any, bool]]) -> list[Any]:
    outputs = []
    for request_id, item, _last in events:
        if isinstance(item, RequestRejectedError):
            outputs.append(RequestRejected(request_id, str(item), no_room=isinstance(item, NoRoomError)))
        elif isinstance(item, BaseException):
            outputs.append(RequestFailed(request_id, str(item)))
        else:
            outputs.append(item)
    return outputs


def attach_rank_agent(
    loop: DPEngineLoop, state: Any, role: str, host: str, kv_transfer: str = "auto"
) -> PDRankAgent:
    """This rank's KV sender/receiver, hooked into its loop and announced in the store."""
    pool = loop.engine.model_runner.kv_pool
    node_rank = state.topology.node_rank
    sender, receiver = create_transfer(pool, host, 0, advertised_host(host, node_rank), kv_transfer)
    notify = loop.router.wake if loop.router.is_front_end else None
    agent = PDRankAgent(loop.engine, role, sender, receiver, notify)
    loop.pd = GroupPD(agent)
    state.store.set(STORE_KEY.format(rank=state.rank), f"{node_rank} {receiver.address}")
    return agent


def read_receivers(
    store: Any, world_size: int, timeout_s: float = ANNOUNCE_TIMEOUT_S
) -> list[tuple[int, str]]:
    """(node rank, receiver address) of every rank, in rank order; waits for every rank to announce."""
    keys = [STORE_KEY.format(rank=rank) for rank in range(world_size)]
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    receivers = []
    for key in keys:
        node, _, address = store.get(key).decode().partition(" ")
        receivers.append((int(node), address))
    return receivers


def attach_role(loop: DPEngineLoop, state: Any, args: Any) -> PDRankAgent | None:
    """`moefleet serve --role prefill|decode` in a group: this rank's agent (None for a mixed group)."""
    role = getattr(args, "role", "mixed")
    if role == "mixed":
        return None
    agent = attach_rank_agent(loop, state, role, args.host, getattr(args, "kv_transfer", "auto"))
    if state.rank == 0:
        print(
            f"moefleet serve: role {role} over {state.world_size} ranks, KV transfer backend "
            f"{agent.sender.name} (rank 0 receives at {agent.receiver.address})",
            file=sys.stderr,
            flush=True,
        )
    return agent


def front_end_client(loop: DPEngineLoop, state: Any, agent: PDRankAgent | None) -> DPFrontEndClient:
    """The HTTP server's engine client on rank 0: a PD front end when the group plays a role."""
    if agent is None:
        return DPFrontEndClient(loop, state)
    return PDFrontEndClient(loop, state, agent.role, agent)


class PDFrontEndClient(DPFrontEndClient):
    """The front end of a prefill or decode group: a DP group client that also places transfer requests."""

    _thread_name = "moefleet-dp-engine-pd"

    def __init__(self, loop: DPEngineLoop, state: Any, role: str, agent: PDRankAgent, **options: Any):
        super().__init__(loop, state, **options)
        self.role = role
        self.sender = agent.sender
        self.receiver = agent.receiver
        self.receivers = read_receivers(state.store, state.world_size)

    def bootstrap(self) -> dict[str, Any]:
        """GET /v1/pd/bootstrap: every rank's receiver; `kv_port` / `kv_address` are rank 0's (the rank a
        request without `x-moefleet-dp-rank` is placed on)."""
        ports = [int(address.rpartition(":")[2]) for _, address in self.receivers]
        return {
            "role": self.role,
            "kv_transfer_backend": self.sender.name,
            "kv_address": self.receivers[0][1],
            "kv_port": ports[0],
            "dp_size": len(self.receivers),
            "kv_ports": ports,
            "kv_addresses": [address for _, address in self.receivers],
            "kv_nodes": [node for node, _ in self.receivers],
            "kv_layout": self._loop.engine.model_runner.kv_pool.layout().to_dict(),
        }

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        pd = current_pd_request.get()
        if pd is None:
            super()._submit_add(request_id, prompt_token_ids, sampling_params)
            return
        rank = None
        if self.role == "decode":
            rank = 0 if pd.dp_rank is None else pd.dp_rank
            if rank >= len(self.receivers):
                message = f"x-moefleet-dp-rank {rank}: this decode group has {len(self.receivers)} DP ranks"
                self._deliver(request_id, RequestRejectedError(message), last=True)
                return
        payload = (prompt_token_ids, sampling_params, pd)
        self._loop.router.submit(
            AddRequest(request_id, payload, cost=max(len(prompt_token_ids), 1), rank=rank)
        )
