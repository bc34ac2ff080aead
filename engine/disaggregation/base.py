"""The KV transfer seam: a prefill engine pushes one request's KV blocks (+ its first token) to a decode engine.

Handshake (one TCP connection per transfer for the `tcp` backend):
  1. The decode engine reserves blocks for the request and `register`s them under a transfer id (the
     gateway's), with a callback run once the KV has landed (or the transfer failed).
  2. The prefill engine, once the prompt is computed and the first token sampled, `send`s the request's blocks
     to the decode engine's receiver address (`KVReceiver.address`, announced at GET /v1/pd/bootstrap).
  3. The receiver waits (bounded) for the registration, checks the layout, writes the blocks, runs the
     callback and acknowledges; the prefill engine frees its blocks only after the acknowledgement.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moefleet.engine.kv_cache import KVCachePool


class TransferError(RuntimeError):
    """A KV transfer failed (peer gone, layout mismatch, checksum mismatch, aborted, timed out)."""


@dataclass(slots=True)
class TransferResult:
    """What the decode side learns when a transfer ends: the first token (and, when the request asked for
    logprobs, its logprob entry as `logprobs.to_wire` writes it), or why it failed."""

    transfer_id: str
    first_token: int | None
    error: str | None = None
    first_logprob: dict[str, Any] | None = None


# Runs on the receiver's thread once a registered transfer ends (landed or failed).
OnLanded = Callable[[TransferResult], None]


class KVSender(ABC):
    name = "?"

    @abstractmethod
    def send(
        self,
        address: str,
        transfer_id: str,
        blocks: list[int],
        num_tokens: int,
        first_token: int,
        first_logprob: dict[str, Any] | None = None,
    ) -> None:
        """Push `blocks` (holding `num_tokens` prompt tokens) to the receiver at `address`, with the first
        token (and its logprob entry, when the request asked: `logprobs.to_wire`); returns once the receiver
        acknowledged, raises TransferError otherwise. Blocking: call it off the engine thread."""

    def close(self) -> None:
        """Release what the sender keeps between transfers (p2p: its pair groups)."""
        return None


class KVReceiver(ABC):
    name = "?"

    @property
    @abstractmethod
    def address(self) -> str:
        """Where senders connect (announced to the gateway)."""

    @abstractmethod
    def register(self, transfer_id: str, blocks: list[int], num_tokens: int, on_landed: OnLanded) -> None:
        """Expect a transfer into `blocks` (reserved by the engine until `on_landed` runs or `cancel` is True)."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Forget a registration. True: no write into its blocks is under way or will happen (free them now);
        False: a write is under way, its `on_landed` (with an error) will still run (free them then)."""

    @abstractmethod
    def refuse(self, transfer_id: str, reason: str) -> None:
        """`transfer_id` will never be registered here (the request was rejected): refuse its sender now."""

    @abstractmethod
    def close(self) -> None: ...


KV_TRANSFER_CHOICES = ("auto", "tcp", "p2p")


def choose_kv_transfer(requested: str, device: str = "cpu") -> str:
    """The backend `--kv-transfer` names. `auto`: `p2p` when the KV cache lives on a CUDA device (NCCL device
    to device; verified on 2x H200, prefill on GPU 0 and decode on GPU 1: docs/benchmarks.md), else `tcp`
    (host pools: p2p over gloo would only add a process group to what tcp already does)."""
    if requested not in KV_TRANSFER_CHOICES:
        raise ValueError(f"--kv-transfer {requested!r}: choose one of {', '.join(KV_TRANSFER_CHOICES)}")
    if requested == "auto":
        return "p2p" if device.startswith("cuda") else "tcp"
    return requested


def create_transfer(
    pool: KVCachePool,
    host: str = "0.0.0.0",
    port: int = 0,
    advertise_host: str | None = None,
    backend: str = "auto",
) -> tuple[KVSender, KVReceiver]:
    """This engine's KV sender (`backend`: auto / tcp / p2p, see `choose_kv_transfer`) and its receiver, which
    takes transfers of every backend (receiver.py). `advertise_host`: the address the receiver announces
    (default: `host`, or 127.0.0.1 for a wildcard)."""
    from moefleet.engine.disaggregation.receiver import KVServer

    sender: KVSender
    if choose_kv_transfer(backend, torch.device(pool.device).type) == "p2p":
        from moefleet.engine.disaggregation.p2p import P2PSender

        sender = P2PSender(pool)
    else:
        from moefleet.engine.disaggregation.tcp import TcpSender

        sender = TcpSender(pool)
    return sender, KVServer(pool, host, port, advertise_host)
