"""`tcp` KV transfer: portable (any network, CPU tests), host-staged, chunked, checksummed, bounded memory.

The control protocol is wire.py's (the header has no `"data"` field, or `"data": "tcp"`). After the ok
reply the data travels on the same connection: chunks of a 4-byte length + a 4-byte CRC-32 + the payload
(units of `KVCachePool.read_unit`, concatenated in `request_units` order, cut into chunks of at most
CHUNK_BYTES). The sender stages one chunk on the host at a time and the receiver (`TcpData`, run by the
decode engine's `KVServer`) writes each unit as soon as it is complete, so memory stays at about one chunk per
transfer on each side whatever the prompt length.
"""

from __future__ import annotations

import socket
import struct
import zlib
from typing import Any

from moefleet.engine.disaggregation.base import KVSender, TransferError
from moefleet.engine.disaggregation.wire import Registration, open_transfer, read_ack, recv_exact
from moefleet.engine.kv_cache import KVCachePool

CHUNK_BYTES = 1 << 20
_CHUNK = struct.Struct("!II")


def transfer_header(
    pool: KVCachePool,
    transfer_id: str,
    blocks: list[int],
    num_tokens: int,
    first_token: int,
    first_logprob: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The header fields every backend sends (wire.py). `first_logprob` only when the request asked for
    logprobs (absent otherwise, so receivers that predate it are unaffected)."""
    header = {
        "transfer_id": transfer_id,
        "num_tokens": num_tokens,
        "num_blocks": len(blocks),
        "first_token": first_token,
        "layout": pool.layout().to_dict(),
        "total_bytes": pool.span_bytes(range(pool.num_layers), len(blocks)),
    }
    if first_logprob is not None:
        header["first_logprob"] = first_logprob
    return header


class TcpSender(KVSender):
    name = "tcp"

    def __init__(self, pool: KVCachePool, chunk_bytes: int = CHUNK_BYTES):
        self.pool = pool
        self.chunk_bytes = chunk_bytes

    def send(
        self,
        address: str,
        transfer_id: str,
        blocks: list[int],
        num_tokens: int,
        first_token: int,
        first_logprob: dict[str, Any] | None = None,
    ) -> None:
        pool = self.pool
        header = transfer_header(pool, transfer_id, blocks, num_tokens, first_token, first_logprob)
        sock, _ = open_transfer(address, header)
        try:
            with sock:
                staged = bytearray()
                for layer, block in pool.request_units(blocks):
                    staged += pool.read_unit(layer, block)
                    if len(staged) >= self.chunk_bytes:
                        self._send_chunk(sock, staged)
                        staged = bytearray()
                if staged:
                    self._send_chunk(sock, staged)
                read_ack(sock, transfer_id)
        except OSError as exc:
            raise TransferError(f"KV transfer {transfer_id} to {address} failed: {exc}") from exc

    @staticmethod
    def _send_chunk(sock: socket.socket, data: bytearray) -> None:
        sock.sendall(_CHUNK.pack(len(data), zlib.crc32(data)) + data)


class TcpData:
    """The receiver's side of the tcp data path (a `wire.DataPath`)."""

    def __init__(self, pool: KVCachePool):
        self.pool = pool

    def check(self, header: dict[str, Any]) -> None:
        return None

    def ok_fields(self, header: dict[str, Any]) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None

    def receive(self, sock: socket.socket, header: dict[str, Any], reg: Registration) -> None:
        pool = self.pool
        units = list(pool.request_units(reg.blocks))
        total = int(header["total_bytes"])
        pending = bytearray()
        index, received = 0, 0
        while received < total:
            size, crc = _CHUNK.unpack(recv_exact(sock, _CHUNK.size))
            if size == 0 or received + size > total:
                raise TransferError(f"chunk of {size} bytes overruns the transfer ({received}/{total})")
            data = recv_exact(sock, size)
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
