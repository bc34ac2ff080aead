"""`tcp` KV transfer: portable (any network, CPU tests), host-staged, chunked, checksummed, bounded memory.

One connection per transfer. Frames: JSON messages are a 4-byte big-endian length + UTF-8 JSON; data chunks
are a 4-byte length + a 4-byte CRC-32 + the payload (units of `KVCachePool.read_unit`, concatenated in
`request_units` order, cut into chunks of at most CHUNK_BYTES). The sender stages one chunk on the host at a
time and the receiver writes each unit as soon as it is complete, so memory stays at about one chunk per
transfer on each side whatever the prompt length.

    sender                                    receiver
    {"transfer_id", "num_tokens", "num_blocks", "first_token", "layout", "total_bytes"}  ->
                                          <-  {"ok": true} once registered and the layout matches
    chunk, chunk, ...                     ->  (CRC checked, units written into the reserved blocks)
                                          <-  {"ok": true} after the decode engine was told (ack)
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from moefleet.engine.disaggregation.base import KVReceiver, KVSender, OnLanded, TransferError, TransferResult
from moefleet.engine.kv_cache import KVCachePool, KVLayout

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# How long a receiver holds a connection whose transfer id the decode engine has not registered yet (the
# gateway sends the request to decode first, but the two HTTP calls race).
REGISTER_WAIT_SECONDS = 30.0
IO_TIMEOUT_SECONDS = 60.0
GONE_IDS_KEPT = 4096
_LEN = struct.Struct("!I")
_CHUNK = struct.Struct("!II")


def _send_json(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        count = sock.recv_into(view[got:], n - got)
        if count == 0:
            raise TransferError(f"connection closed with {n - got} of {n} bytes outstanding")
        got += count
    return buffer


def _recv_json(sock: socket.socket) -> dict[str, Any]:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if size > 1 << 20:
        raise TransferError(f"control message of {size} bytes is too large")
    message = json.loads(_recv_exact(sock, size))
    if not isinstance(message, dict):
        raise TransferError("control message is not a JSON object")
    return message


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferError(f"KV receiver address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class TcpSender(KVSender):
    name = "tcp"

    def __init__(self, pool: KVCachePool, chunk_bytes: int = CHUNK_BYTES):
        self.pool = pool
        self.chunk_bytes = chunk_bytes

    def send(
        self, address: str, transfer_id: str, blocks: list[int], num_tokens: int, first_token: int
    ) -> None:
        pool = self.pool
        total = sum(pool.unit_bytes(layer) for layer, _ in pool.request_units(blocks))
        header = {
            "transfer_id": transfer_id,
            "num_tokens": num_tokens,
            "num_blocks": len(blocks),
            "first_token": first_token,
            "layout": pool.layout().to_dict(),
            "total_bytes": total,
        }
        try:
            with socket.create_connection(split_address(address), timeout=10.0) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small control messages
                sock.settimeout(IO_TIMEOUT_SECONDS + REGISTER_WAIT_SECONDS)
                _send_json(sock, header)
                reply = _recv_json(sock)
                if not reply.get("ok"):
                    raise TransferError(f"decode side refused transfer {transfer_id}: {reply.get('error')}")
                sock.settimeout(IO_TIMEOUT_SECONDS)
                staged = bytearray()
                for layer, block in pool.request_units(blocks):
                    staged += pool.read_unit(layer, block)
                    if len(staged) >= self.chunk_bytes:
                        self._send_chunk(sock, staged)
                        staged = bytearray()
                if staged:
                    self._send_chunk(sock, staged)
                reply = _recv_json(sock)
        except OSError as exc:
            raise TransferError(f"KV transfer {transfer_id} to {address} failed: {exc}") from exc
        if not reply.get("ok"):
            raise TransferError(f"KV transfer {transfer_id} not acknowledged: {reply.get('error')}")

    @staticmethod
    def _send_chunk(sock: socket.socket, data: bytearray) -> None:
        sock.sendall(_CHUNK.pack(len(data), zlib.crc32(data)) + data)


@dataclass
class _Registration:
    blocks: list[int]
    num_tokens: int
    on_landed: OnLanded
    in_progress: bool = False
    cancelled: bool = False


class TcpReceiver(KVReceiver):
    name = "tcp"

    def __init__(
        self, pool: KVCachePool, host: str = "0.0.0.0", port: int = 0, advertise_host: str | None = None
    ):
        self.pool = pool
        self._registrations: dict[str, _Registration] = {}
        # Ids cancelled or refused before their transfer arrived: a late sender is told at once (bounded).
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._cond = threading.Condition()
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
            self._registrations[transfer_id] = _Registration(list(blocks), num_tokens, on_landed)
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

    def _claim(self, transfer_id: str) -> _Registration | str:
        """The registration of `transfer_id` (marked in progress), or why there is none."""
        deadline = time.monotonic() + REGISTER_WAIT_SECONDS
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
                    return f"transfer id {transfer_id} is not expected here (not registered within {REGISTER_WAIT_SECONDS:g} s)"
                self._cond.wait(left)

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT_SECONDS)
        try:
            header = _recv_json(sock)
            transfer_id = str(header["transfer_id"])
        except (OSError, TransferError, KeyError, ValueError) as exc:
            log.warning("bad KV transfer header: %s", exc)
            return
        reg = self._claim(transfer_id)
        if isinstance(reg, str):
            with _quiet():
                _send_json(sock, {"ok": False, "error": reg})
            return
        result = TransferResult(transfer_id, None, None)
        try:
            self._check(header, reg)
            _send_json(sock, {"ok": True})
            self._receive(sock, reg, int(header["total_bytes"]))
            if reg.cancelled:
                result.error = "the decode request was aborted during the transfer"
            else:
                result.first_token = int(header["first_token"])
        except (OSError, TransferError, KeyError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._registrations.pop(transfer_id, None)
        reg.on_landed(result)
        with _quiet():
            _send_json(sock, {"ok": result.error is None, "error": result.error})

    def _check(self, header: dict[str, Any], reg: _Registration) -> None:
        theirs = KVLayout.from_dict(header["layout"])
        ours = self.pool.layout()
        if theirs != ours:
            raise TransferError(f"KV layout differs: prefill {theirs}, decode {ours}")
        if int(header["num_tokens"]) != reg.num_tokens or int(header["num_blocks"]) != len(reg.blocks):
            raise TransferError(
                f"prefill sends {header['num_tokens']} tokens in {header['num_blocks']} blocks, decode "
                f"reserved {reg.num_tokens} tokens in {len(reg.blocks)} blocks (prompts tokenized differently?)"
            )

    def _receive(self, sock: socket.socket, reg: _Registration, total: int) -> None:
        pool = self.pool
        units = list(pool.request_units(reg.blocks))
        expected = sum(pool.unit_bytes(layer) for layer, _ in units)
        if total != expected:
            raise TransferError(f"sender announces {total} bytes, {expected} expected")
        pending = bytearray()
        index, received = 0, 0
        while received < total:
            size, crc = _CHUNK.unpack(_recv_exact(sock, _CHUNK.size))
            if size == 0 or received + size > total:
                raise TransferError(f"chunk of {size} bytes overruns the transfer ({received}/{total})")
            data = _recv_exact(sock, size)
            if zlib.crc32(data) != crc:
                raise TransferError(f"checksum mismatch in the chunk at byte {received}")
            received += size
            if pending:  # a unit that started in the previous chunk
                data = pending + data
            view, offset = memoryview(data), 0
            while index < len(units):
                layer, block = units[index]
                need = pool.unit_bytes(layer)
                if len(data) - offset < need:
                    break
                if not reg.cancelled:
                    pool.write_unit(layer, block, view[offset : offset + need])
                offset += need
                index += 1
            pending = bytearray(view[offset:])
            view.release()


class _quiet:
    """Ignore socket errors of best-effort replies (the peer may be gone)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)
