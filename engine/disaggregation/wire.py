"""The control connection of a KV transfer (every backend): framing, timeouts and the sender's side of the
handshake. One TCP connection per transfer; JSON messages are a 4-byte big-endian length + UTF-8 JSON.

    sender                                    receiver (receiver.py: one server for every backend)
    header {"transfer_id", "num_tokens", "num_blocks", "first_token", "layout", "total_bytes",
            "first_logprob" (only when the request asked for logprobs: {"token_id", "logprob", "top"}),
            "data": "tcp" | "p2p" (absent: tcp), + the data path's own fields}  ->
                                          <-  {"ok": true, + the data path's fields} once registered and the
                                              layout matches (or {"ok": false, "error"})
    data (tcp.py: CRC-checked chunks on this connection; p2p.py: a go message here, tensors on a pair group)
                                          <-  {"ok": true} after the decode engine was told (the ack)
"""

from __future__ import annotations

import json
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from moefleet.engine.disaggregation.base import OnLanded, TransferError

# How long a receiver holds a connection whose transfer id the decode engine has not registered yet (the
# gateway sends the request to decode first, but the two HTTP calls race).
REGISTER_WAIT_SECONDS = 30.0
IO_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0
_LEN = struct.Struct("!I")


def send_json(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        count = sock.recv_into(view[got:], n - got)
        if count == 0:
            raise TransferError(f"connection closed with {n - got} of {n} bytes outstanding")
        got += count
    return buffer


def recv_json(sock: socket.socket) -> dict[str, Any]:
    (size,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if size > 1 << 20:
        raise TransferError(f"control message of {size} bytes is too large")
    message = json.loads(recv_exact(sock, size))
    if not isinstance(message, dict):
        raise TransferError("control message is not a JSON object")
    return message


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferError(f"KV receiver address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def open_transfer(address: str, header: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
    """Connect to the receiver at `address`, send `header` and return the socket with the receiver's ok reply
    (raises TransferError when refused; the caller closes the socket)."""
    try:
        sock = socket.create_connection(split_address(address), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        raise TransferError(f"KV transfer {header['transfer_id']} to {address} failed: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small control messages
        sock.settimeout(IO_TIMEOUT_SECONDS + REGISTER_WAIT_SECONDS)
        send_json(sock, header)
        reply = recv_json(sock)
        if not reply.get("ok"):
            raise TransferError(f"decode side refused transfer {header['transfer_id']}: {reply.get('error')}")
        sock.settimeout(IO_TIMEOUT_SECONDS)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise TransferError(f"KV transfer {header['transfer_id']} to {address} failed: {exc}") from exc
        raise
    return sock, reply


def read_ack(sock: socket.socket, transfer_id: str) -> None:
    reply = recv_json(sock)
    if not reply.get("ok"):
        raise TransferError(f"KV transfer {transfer_id} not acknowledged: {reply.get('error')}")


def peer_gone(sock: socket.socket) -> str | None:
    """Why the peer of a control connection that is quiet during the data is gone (it closed, or it sent an
    error), or None: quiet, or its ack is already waiting (read later by `read_ack`). Never blocks, never
    consumes (the peek sees a whole message, up to 64 KiB)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return None
        data = sock.recv(1 << 16, socket.MSG_PEEK)
    except OSError as exc:
        return f"the control connection failed: {exc}"
    if not data:
        return "the peer closed the connection"
    if len(data) < _LEN.size or len(data) < _LEN.size + _LEN.unpack(data[: _LEN.size])[0]:
        return None  # a message still arriving
    try:
        message = json.loads(data[_LEN.size : _LEN.size + _LEN.unpack(data[: _LEN.size])[0]])
    except ValueError:
        return "the peer sent a malformed control message"
    if isinstance(message, dict) and message.get("ok"):
        return None
    return f"the peer ended the transfer: {message.get('error') if isinstance(message, dict) else message}"


class quiet:
    """Ignore socket errors of best-effort replies (the peer may be gone)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


@dataclass
class Registration:
    """A transfer the decode engine expects: its reserved blocks and who to tell when it ends."""

    blocks: list[int]
    num_tokens: int
    on_landed: OnLanded
    in_progress: bool = False
    cancelled: bool = False  # set by the decode engine mid-transfer: the data is drained, not written


class DataPath(Protocol):
    """How a receiver takes the data of one transfer after its header (one per `"data"` mode)."""

    def check(self, header: dict[str, Any]) -> None:
        """Raise TransferError when this receiver cannot take the transfer the header describes."""

    def ok_fields(self, header: dict[str, Any]) -> dict[str, Any]:
        """Fields of the ok reply the sender needs (e.g. where to meet), right after `check(header)`."""

    def receive(self, sock: socket.socket, header: dict[str, Any], reg: Registration) -> None:
        """Take the data into `reg.blocks` (not when `reg.cancelled`); raise TransferError on failure."""

    def close(self) -> None: ...
