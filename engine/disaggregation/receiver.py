"""The KV receiver of a decode engine: one TCP server for every transfer backend (`KVServer`).

It owns the registrations (the decode engine's reserved blocks per transfer id), answers each sender's
header (wire.py) once the id is registered and the layout matches, hands the data to the path the header
names (`"data": "tcp"` - tcp.py, the default when absent - or `"p2p"` - p2p.py, created on the first such
transfer), then tells the decode engine (`on_landed`) and acknowledges. So senders of either backend can push
to the same decode engine.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections import OrderedDict
from typing import Any

from moefleet.engine.disaggregation import wire
from moefleet.engine.disaggregation.base import KVReceiver, OnLanded, TransferError, TransferResult
from moefleet.engine.disaggregation.tcp import TcpData
from moefleet.engine.disaggregation.wire import DataPath, Registration, quiet, recv_json, send_json
from moefleet.engine.kv_cache import KVCachePool, KVLayout

log = logging.getLogger(__name__)

GONE_IDS_KEPT = 4096


class KVServer(KVReceiver):
    name = "tcp+p2p"

    def __init__(
        self, pool: KVCachePool, host: str = "0.0.0.0", port: int = 0, advertise_host: str | None = None
    ):
        self.pool = pool
        self._registrations: dict[str, Registration] = {}
        # Ids cancelled or refused before their transfer arrived: a late sender is told at once (bounded).
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._cond = threading.Condition()
        self._paths: dict[str, DataPath] = {"tcp": TcpData(pool)}
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                receiver._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        bound_host, bound_port = self._server.server_address[:2]
        if advertise_host is None:
            advertise_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else str(bound_host)
        self._address = f"{advertise_host}:{bound_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moefleet-kv-recv", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        return self._address

    def register(self, transfer_id: str, blocks: list[int], num_tokens: int, on_landed: OnLanded) -> None:
        with self._cond:
            if transfer_id in self._registrations:
                raise ValueError(f"transfer id {transfer_id!r} is already registered")
            self._registrations[transfer_id] = Registration(list(blocks), num_tokens, on_landed)
            self._cond.notify_all()

    def cancel(self, transfer_id: str) -> bool:
        with self._cond:
            reg = self._registrations.get(transfer_id)
            if reg is not None and reg.in_progress:
                reg.cancelled = True
                return False
            self._registrations.pop(transfer_id, None)
            self._forget(transfer_id, "the decode request was aborted before its KV arrived")
            return True

    def refuse(self, transfer_id: str, reason: str) -> None:
        """The decode side will never register `transfer_id` (e.g. it rejected the request): a sender that
        brings it is answered at once instead of after the registration wait."""
        with self._cond:
            self._forget(transfer_id, reason)

    def _forget(self, transfer_id: str, reason: str) -> None:
        self._gone[transfer_id] = reason
        while len(self._gone) > GONE_IDS_KEPT:
            self._gone.popitem(last=False)
        self._cond.notify_all()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for path in list(self._paths.values()):
            path.close()

    def _path(self, mode: str) -> DataPath:
        with self._cond:
            path = self._paths.get(mode)
            if path is None and mode == "p2p":
                from moefleet.engine.disaggregation.p2p import P2PData

                path = self._paths["p2p"] = P2PData(self.pool)
            if path is None:
                raise TransferError(f"unknown KV data path {mode!r} (this receiver takes tcp and p2p)")
            return path

    def _claim(self, transfer_id: str) -> Registration | str:
        """The registration of `transfer_id` (marked in progress), or why there is none."""
        wait = wire.REGISTER_WAIT_SECONDS
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                reg = self._registrations.get(transfer_id)
                if reg is not None:
                    reg.in_progress = True
                    return reg
                if transfer_id in self._gone:
                    return self._gone[transfer_id]
                left = deadline - time.monotonic()
                if left <= 0:
                    return (
                        f"transfer id {transfer_id} is not expected here (not registered within {wait:g} s)"
                    )
                self._cond.wait(left)

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(wire.IO_TIMEOUT_SECONDS)
        try:
            header = recv_json(sock)
            transfer_id = str(header["transfer_id"])
            path = self._path(str(header.get("data", "tcp")))
        except (OSError, TransferError, KeyError, ValueError) as exc:
            log.warning("bad KV transfer header: %s", exc)
            with quiet():
                send_json(sock, {"ok": False, "error": str(exc)})
            return
        reg = self._claim(transfer_id)
        if isinstance(reg, str):
            with quiet():
                send_json(sock, {"ok": False, "error": reg})
            return
        result = TransferResult(transfer_id, None, None)
        try:
            self._check(header, reg)
            path.check(header)
            send_json(sock, {"ok": True, **path.ok_fields(header)})
            path.receive(sock, header, reg)
            if reg.cancelled:
                result.error = "the decode request was aborted during the transfer"
            else:
                result.first_token = int(header["first_token"])
                result.first_logprob = header.get("first_logprob")
        except Exception as exc:  # whatever went wrong, the decode engine must hear of it (on_landed)
            result.error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._registrations.pop(transfer_id, None)
        reg.on_landed(result)
        with quiet():
            send_json(sock, {"ok": result.error is None, "error": result.error})

    def _check(self, header: dict[str, Any], reg: Registration) -> None:
        theirs = KVLayout.from_dict(header["layout"])
        ours = self.pool.layout()
        if theirs != ours:
            raise TransferError(f"KV layout differs: prefill {theirs}, decode {ours}")
        if int(header["num_tokens"]) != reg.num_tokens or int(header["num_blocks"]) != len(reg.blocks):
            raise TransferError(
                f"prefill sends {header['num_tokens']} tokens in {header['num_blocks']} blocks, decode "
                f"reserved {reg.num_tokens} tokens in {len(reg.blocks)} blocks (prompts tokenized differently?)"
            )
        expected = self.pool.span_bytes(range(self.pool.num_layers), len(reg.blocks))
        if int(header["total_bytes"]) != expected:
            raise TransferError(f"sender announces {header['total_bytes']} bytes, {expected} expected")
