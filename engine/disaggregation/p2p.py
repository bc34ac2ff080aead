"""`p2p` KV transfer: device to device over a torch.distributed pair group (NCCL on CUDA, gloo on CPU).

Control stays on wire.py's TCP connection (registration, refusal, cancel, the registration wait, layout
check, the ack); only the KV moves over the pair group, a process group of exactly two members: the prefill
engine's sender (rank 0) and the decode engine's receiver (rank 1).

Data flow of one transfer:

    sender (prefill engine)                       receiver (decode engine's KVServer, P2PData)
    header {..., "data": "p2p", "sender_id", "device", "chunk_bytes"}  ->
                                              <-  {"ok": true, "store_port", "pair"} (registered, layout matches;
                                                  the receiver hosts one TCPStore for its pair groups)
    takes the per-receiver pair lock (bounded), then
    {"pair": "<sender id>/<generation>", "new"}  ->   (the go message)
    new pair: both build the group over PrefixStore("moefleet/kv-pair/<pair>") of that store and exchange one
    warm-up element (bounded: PAIR_TIMEOUT_SECONDS); cached per receiver address (sender) and per sender id
    (receiver)
    for each chunk (plan_chunks: whole layers packed, or one layer's blocks split, at most chunk_bytes):
      gather_blocks -> staging on the pool's device   recv into staging of the same size
      send(staging, dst=1, tag=chunk)                 scatter_blocks into the reserved blocks (not if cancelled)
                                              <-  {"ok": true} after on_landed (the ack)
    releases the lock; the prefill engine frees its blocks

The lock is taken after the ok reply, not at the header: a transfer waiting for its registration (up to
REGISTER_WAIT_SECONDS) then holds no pair, and from go to ack the pair carries one transfer, so sends and
receives always match in order. Staging: two buffers of at most chunk_bytes per side (chunk i+1 is gathered /
received while chunk i is in flight). On CUDA every copy and the send / recv run on a dedicated stream that
first waits on the thread's current stream (the engine's forward runs on the default stream, which wrote the
KV); the stream is synchronized before the sender returns (so its blocks are freed only once read) and before
the receiver runs on_landed (so decoding reads the landed KV). Every wait is bounded and watches the control
connection: a peer that closes it, or a timeout, fails the transfer (TransferError) on both sides and drops
the pair group (the next transfer builds a new one), never a hang. NCCL has not run on a GPU yet (gloo on CPU
is tested), so `--kv-transfer auto` does not pick p2p.

Bounded pair caches: each side keeps at most `max_pairs` pair groups (MOEFLEET_KV_P2P_MAX_PAIRS, default 16;
each holds an NCCL communicator with device buffers on GPUs) and drops pairs unused for PAIR_IDLE_SECONDS (a
background sweep, so the pairs of prefill ranks that were scaled away go too). `pairs_to_drop` decides: idle
ones, then the least recently used, never a busy one (sender: its pair lock is held; receiver: a transfer is
on it, or an ok reply went to its sender and that transfer's go has not come yet), so while every pair is
busy the cache grows past the bound and is trimmed once they end. A dropped pair is aborted (`abort()`: frees
the communicator at once, never waits for the peer). The peer learns lazily, with no extra message: the
receiver's ok reply names the pair it holds for that sender (`"pair"`, "" for none); a sender whose cached
pair (built before that reply) differs drops its own half and announces a new generation (go with "new"). A
receiver's half of a pair its sender dropped goes at that sender's next new pair, by its own bound or by its
idle sweep. Older senders ignore `"pair"`: their transfer on a pair the receiver dropped fails once, and the
next one builds a new pair.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from moefleet.engine.disaggregation import wire
from moefleet.engine.disaggregation.base import KVSender, TransferError
from moefleet.engine.disaggregation.tcp import transfer_header
from moefleet.engine.disaggregation.wire import (
    Registration,
    open_transfer,
    peer_gone,
    read_ack,
    recv_json,
    send_json,
    split_address,
)
from moefleet.engine.kv_cache import KVCachePool

CHUNK_BYTES = 64 << 20
MAX_CHUNK_BYTES = 1 << 30  # a receiver refuses larger staging
PAIR_TIMEOUT_SECONDS = 30.0
STORE_PREFIX = "moefleet/kv-pair/"
MAX_PAIRS_ENV = "MOEFLEET_KV_P2P_MAX_PAIRS"
DEFAULT_MAX_PAIRS = 16
PAIR_IDLE_SECONDS = 600.0
HINT = "; check that both engines reach each other, or use --kv-transfer tcp"
T = TypeVar("T")


def plan_chunks(unit_bytes: list[int], num_blocks: int, limit: int) -> list[tuple[range, slice]]:
    """(layers, slice of the request's blocks) of each chunk: consecutive whole layers while they fit in
    `limit` bytes; a layer whose blocks alone exceed it is cut into block slices (at least one block each)."""
    chunks: list[tuple[range, slice]] = []
    start, size = 0, 0
    for layer, unit in enumerate(unit_bytes):
        whole = unit * num_blocks
        if size and size + whole > limit:
            chunks.append((range(start, layer), slice(0, num_blocks)))
            start, size = layer, 0
        if whole > limit:
            step = max(1, limit // unit)
            chunks += [
                (range(layer, layer + 1), slice(b, min(b + step, num_blocks)))
                for b in range(0, num_blocks, step)
            ]
            start = layer + 1
        else:
            size += whole
    if size:
        chunks.append((range(start, len(unit_bytes)), slice(0, num_blocks)))
    return chunks


def pairs_to_drop(
    pairs: Mapping[str, tuple[float, bool]], now: float, max_pairs: int, idle_seconds: float, adding: int = 0
) -> list[str]:
    """The cached pairs to destroy (`pairs`: key -> (last used, busy)): every one not busy and unused for more
    than `idle_seconds`, then the least recently used of the other idle ones until at most `max_pairs` remain
    with the `adding` pairs about to be built. A busy pair is never chosen (the bound is exceeded meanwhile)."""
    idle = sorted((used, key) for key, (used, busy) in pairs.items() if not busy)
    stale = [key for used, key in idle if now - used > idle_seconds]
    fresh = [key for used, key in idle if now - used <= idle_seconds]
    excess = len(pairs) + adding - len(stale) - max_pairs
    return stale + fresh[: max(0, excess)]


def max_pairs_setting(value: int | None = None) -> int:
    """`value`, else MOEFLEET_KV_P2P_MAX_PAIRS, else DEFAULT_MAX_PAIRS; at least 1."""
    raw = os.environ.get(MAX_PAIRS_ENV, "") if value is None else str(value)
    if not raw:
        return DEFAULT_MAX_PAIRS
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(
            f"{MAX_PAIRS_ENV}={raw!r}: the p2p pair groups kept per engine must be a whole number >= 1 "
            f"(default {DEFAULT_MAX_PAIRS})"
        )
    return int(raw)


class _Sweeper:
    """Calls the bound method `sweep` every `interval` seconds on a daemon thread until `stop` or until its
    object is garbage (the thread holds it weakly)."""

    def __init__(self, sweep: Callable[[], None], interval: float):
        self._stop = threading.Event()
        method = weakref.WeakMethod(sweep)  # type: ignore[arg-type]

        def run() -> None:
            while not self._stop.wait(interval):
                bound_sweep = method()
                if bound_sweep is None:
                    return
                bound_sweep()
                del bound_sweep

        threading.Thread(target=run, name="moefleet-kv-pair-sweep", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def _sweep_interval(idle_seconds: float) -> float:
    return min(60.0, max(0.05, idle_seconds / 4))


def _device(pool: KVCachePool) -> torch.device:
    return pool.caches[0].device


def new_pair_group(store: Any, pair: str, rank: int, device: torch.device, local_host: str) -> Any:
    """Rank `rank` of the two-member group `pair`: NCCL for CUDA tensors, gloo (on `local_host`) otherwise."""
    prefixed = dist.PrefixStore(STORE_PREFIX + pair, store)
    timeout = datetime.timedelta(seconds=wire.IO_TIMEOUT_SECONDS + PAIR_TIMEOUT_SECONDS)
    if device.type == "cuda":
        nccl_options = dist.ProcessGroupNCCL.Options()
        # Longer than our own waits: we abort a stuck pair before NCCL's watchdog would act.
        nccl_options._timeout = timeout + timeout
        nccl_options.is_high_priority_stream = False
        return dist.ProcessGroupNCCL(prefixed, rank, 2, nccl_options)
    gloo_options = getattr(dist.ProcessGroupGloo, "_Options")()  # noqa: B009 (not in the stubs)
    gloo_options._timeout = timeout
    gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, gloo_options)


def bounded(fn: Callable[[], T], timeout: float, sock: socket.socket, what: str, hint: str = HINT) -> T:
    """`fn()` on a helper thread (set-up and gloo waits block inside C++), given up after `timeout` seconds
    or as soon as the peer leaves the control connection."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=run, name="moefleet-kv-pair", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.01)
        gone = peer_gone(sock) if thread.is_alive() else None
        if gone or time.monotonic() > deadline:
            raise TransferError(f"{what} failed: {gone or f'not done within {timeout:g} s'}{hint}")
    if error:
        raise TransferError(f"{what} failed: {error[0]}{hint}") from error[0]
    return result[0]


def wait_work(work: Any, device: torch.device, sock: socket.socket, what: str) -> None:
    """Wait for a send / recv (bounded by IO_TIMEOUT_SECONDS), watching the control connection. NCCL: poll
    `is_completed` (a host-side query), then `wait` here, so the transfer stream is the one ordered after it.
    gloo: its works complete only inside `wait` (and a `wait` that times out breaks the pair), so wait on a
    helper thread."""
    if device.type != "cuda":
        bounded(work.wait, wire.IO_TIMEOUT_SECONDS, sock, what, hint="")
        return
    deadline = time.monotonic() + wire.IO_TIMEOUT_SECONDS
    pause = 5e-5
    while not work.is_completed():
        gone = peer_gone(sock)
        if gone or time.monotonic() > deadline:
            raise TransferError(f"{what}: {gone or f'not done within {wire.IO_TIMEOUT_SECONDS:g} s'}")
        time.sleep(pause)
        pause = min(pause * 2, 2e-3)
    try:
        work.wait()
    except RuntimeError as exc:
        raise TransferError(f"{what}: {exc}") from exc


@contextlib.contextmanager
def transfer_stream(device: torch.device) -> Iterator[Callable[[], None]]:
    """Run the copies and sends / recvs of a transfer on their own CUDA stream, after the current stream's
    work (the forward that wrote the KV); yields `synchronize`. A no-op on CPU."""
    if device.type != "cuda":
        yield lambda: None
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield stream.synchronize


def _warm_up(work: Any, device: torch.device) -> None:
    """Finish the pair's first exchange on the helper thread of `bounded` (NCCL builds its communicator on the
    first send / recv; its `wait` only orders streams, so poll the completion)."""
    while device.type == "cuda" and not work.is_completed():
        time.sleep(1e-3)
    work.wait()


def _abort(group: Any) -> None:
    with contextlib.suppress(Exception):
        group.abort()


def _close_pairs(sweeper: _Sweeper, guard: Any, pairs: dict[Any, Any]) -> None:
    """Stop a side's idle sweep and abort every pair group it holds."""
    sweeper.stop()
    with guard:
        for pair in pairs.values():
            _abort(pair.group)
        pairs.clear()


@dataclass
class _Pair:
    key: str
    group: Any
    store: Any = None  # the sender's client of the receiver's TCPStore
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # receiver: transfers on it now


def _staging(pool: KVCachePool, plan: list[tuple[range, slice]], blocks: list[int]) -> list[torch.Tensor]:
    biggest = max(pool.span_bytes(layers, len(blocks[part])) for layers, part in plan)
    return [torch.empty(biggest, dtype=torch.uint8, device=_device(pool)) for _ in range(min(2, len(plan)))]


class P2PSender(KVSender):
    name = "p2p"

    def __init__(
        self,
        pool: KVCachePool,
        chunk_bytes: int = CHUNK_BYTES,
        max_pairs: int | None = None,
        idle_seconds: float | None = None,
    ):
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes {chunk_bytes}: must be in (0, {MAX_CHUNK_BYTES}]")
        self.pool = pool
        self.chunk_bytes = chunk_bytes
        self.max_pairs = max_pairs_setting(max_pairs)
        self.idle_seconds = PAIR_IDLE_SECONDS if idle_seconds is None else idle_seconds
        self.sender_id = uuid.uuid4().hex
        self._generation = itertools.count()
        self._pairs: dict[str, _Pair] = {}  # by receiver address
        self._locks: dict[str, threading.Lock] = {}  # by receiver address, kept (a waiter may hold one)
        self._guard = threading.Lock()
        self._sweeper = _Sweeper(self._evict, _sweep_interval(self.idle_seconds))

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
        header.update(
            data="p2p", sender_id=self.sender_id, device=_device(pool).type, chunk_bytes=self.chunk_bytes
        )
        asked = time.monotonic()
        sock, reply = open_transfer(address, header)
        with sock, self._pair_lock(address, transfer_id):
            pair = self._pairs.get(address)
            held = reply.get("pair")  # receivers that bound their pairs name the one they hold for us
            if pair is not None and held is not None and held != pair.key and pair.created < asked:
                self._drop(address)  # the receiver dropped its half: build a new generation
                pair = None
            if pair is None:
                self._evict(adding=1, keep=address)
            try:
                key = pair.key if pair is not None else f"{self.sender_id}/{next(self._generation)}"
                send_json(sock, {"pair": key, "new": pair is None})
                if pair is None:
                    pair = self._new_pair(address, key, int(reply["store_port"]), sock)
                self._push(pair.group, sock, transfer_id, blocks)
                read_ack(sock, transfer_id)
                pair.last_used = time.monotonic()
            except BaseException as exc:  # the pair's state is unknown now: both sides drop it
                self._drop(address)
                if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, TransferError):
                    raise TransferError(f"KV transfer {transfer_id} to {address} failed: {exc}") from exc
                raise

    def close(self) -> None:
        _close_pairs(self._sweeper, self._guard, self._pairs)

    def _evict(self, adding: int = 0, keep: str | None = None) -> None:
        """Destroy the pairs `pairs_to_drop` picks (idle, or beyond the bound with `adding` more); a pair whose
        lock is held (a transfer on it, or `keep`: the caller's) is busy."""
        with self._guard:
            view = {
                address: (pair.last_used, address == keep or self._locks[address].locked())
                for address, pair in self._pairs.items()
            }
        for address in pairs_to_drop(view, time.monotonic(), self.max_pairs, self.idle_seconds, adding):
            lock = self._locks[address]
            if lock.acquire(blocking=False):  # not if a transfer took it since
                try:
                    self._drop(address)
                finally:
                    lock.release()

    @contextlib.contextmanager
    def _pair_lock(self, address: str, transfer_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(address, threading.Lock())
        if not lock.acquire(timeout=wire.IO_TIMEOUT_SECONDS):
            raise TransferError(f"KV transfer {transfer_id}: the pair group to {address} stayed busy")
        try:
            yield
        finally:
            lock.release()

    def _new_pair(self, address: str, key: str, store_port: int, sock: socket.socket) -> _Pair:
        host = split_address(address)[0]
        local_host = sock.getsockname()[0]
        device = _device(self.pool)

        def make() -> _Pair:
            store = dist.TCPStore(
                host, store_port, is_master=False, timeout=datetime.timedelta(seconds=PAIR_TIMEOUT_SECONDS)
            )
            group = new_pair_group(store, key, 0, device, local_host)
            _warm_up(group.send([torch.ones(1, device=device)], 1, 0), device)  # both ends connected
            return _Pair(key, group, store)

        pair = bounded(make, PAIR_TIMEOUT_SECONDS, sock, f"p2p pair group with {address}")
        with self._guard:
            self._pairs[address] = pair
        return pair

    def _drop(self, address: str) -> None:
        with self._guard:
            pair = self._pairs.pop(address, None)
        if pair is not None:
            _abort(pair.group)

    def _push(self, group: Any, sock: socket.socket, transfer_id: str, blocks: list[int]) -> None:
        pool = self.pool
        plan = plan_chunks(
            [pool.unit_bytes(i) for i in range(pool.num_layers)], len(blocks), self.chunk_bytes
        )
        with transfer_stream(_device(pool)) as synchronize:
            buffers = _staging(pool, plan, blocks)
            works: list[Any] = [None] * len(buffers)
            for index, (layers, part) in enumerate(plan):
                slot = index % len(buffers)
                if works[slot] is not None:
                    wait_work(
                        works[slot],
                        _device(pool),
                        sock,
                        f"KV transfer {transfer_id} chunk {index - len(buffers)}",
                    )
                staging = buffers[slot][: pool.span_bytes(layers, len(blocks[part]))]
                pool.gather_blocks(layers, blocks[part], staging)
                works[slot] = group.send([staging], 1, index)
            for work in works:
                if work is not None:
                    wait_work(work, _device(pool), sock, f"KV transfer {transfer_id}")
            synchronize()


class P2PData:
    """The receiver's side of the p2p data path (a `wire.DataPath`): hosts the TCPStore of its pair groups."""

    def __init__(self, pool: KVCachePool, max_pairs: int | None = None, idle_seconds: float | None = None):
        self.pool = pool
        self.max_pairs = max_pairs_setting(max_pairs)
        self.idle_seconds = PAIR_IDLE_SECONDS if idle_seconds is None else idle_seconds
        self._store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False)
        self._pairs: dict[str, _Pair] = {}  # by sender id
        # Sender id -> {transfer id: deadline}: ok replies sent to that sender whose go is not read yet.
        self._pins: dict[str, dict[str, float]] = {}
        self._guard = threading.Lock()
        self._sweeper = _Sweeper(self._evict, _sweep_interval(self.idle_seconds))

    def check(self, header: dict[str, Any]) -> None:
        ours, theirs = _device(self.pool).type, header.get("device")
        if theirs != ours:
            raise TransferError(
                f"p2p between a {theirs} prefill pool and a {ours} decode pool; use --kv-transfer tcp"
            )
        chunk = int(header.get("chunk_bytes", 0))
        if not 0 < chunk <= MAX_CHUNK_BYTES:
            raise TransferError(f"p2p chunk of {chunk} bytes (at most {MAX_CHUNK_BYTES})")
        if not str(header.get("sender_id", "")):
            raise TransferError("p2p header without sender_id")

    def ok_fields(self, header: dict[str, Any]) -> dict[str, Any]:
        """Where to meet, and the pair held for this sender ("" for none; pinned until its go arrives)."""
        sender = str(header["sender_id"])
        deadline = time.monotonic() + wire.IO_TIMEOUT_SECONDS + PAIR_TIMEOUT_SECONDS  # the sender's lock wait
        with self._guard:  # pinned even with no pair yet: one this sender builds first stays for this go
            pair = self._pairs.get(sender)
            self._pins.setdefault(sender, {})[str(header["transfer_id"])] = deadline
        return {"store_port": self._store.port, "pair": pair.key if pair is not None else ""}

    def _evict(self, adding: int = 0, keep: str | None = None) -> None:
        """Destroy the pairs `pairs_to_drop` picks; busy: a transfer on it, a live pin, or `keep`."""
        now = time.monotonic()
        with self._guard:
            for sender in list(self._pins):
                live = {tid: end for tid, end in self._pins[sender].items() if end > now}
                if live:
                    self._pins[sender] = live
                else:
                    del self._pins[sender]
            view = {
                sender: (pair.last_used, sender == keep or pair.busy > 0 or sender in self._pins)
                for sender, pair in self._pairs.items()
            }
            victims = [
                self._pairs.pop(s)
                for s in pairs_to_drop(view, now, self.max_pairs, self.idle_seconds, adding)
            ]
        for pair in victims:
            _abort(pair.group)

    def close(self) -> None:
        _close_pairs(self._sweeper, self._guard, self._pairs)

    def receive(self, sock: socket.socket, header: dict[str, Any], reg: Registration) -> None:
        sender = str(header["sender_id"])
        try:
            go = recv_json(sock)  # sent once the sender holds its pair lock
            pair = self._take(sender, go, sock)
        finally:
            with self._guard:
                pins = self._pins.get(sender, {})
                pins.pop(str(header["transfer_id"]), None)
                if not pins:
                    self._pins.pop(sender, None)
        try:
            self._pull(pair.group, sock, header, reg)
        except BaseException:  # the pair's state is unknown now: both sides drop it
            with self._guard:
                if self._pairs.get(sender) is pair:
                    del self._pairs[sender]
            _abort(pair.group)
            raise
        finally:
            with self._guard:
                pair.busy -= 1
                pair.last_used = time.monotonic()
        self._evict()  # back within the bound if it was exceeded while every pair was busy

    def _take(self, sender: str, go: dict[str, Any], sock: socket.socket) -> _Pair:
        """The pair the go message names, marked busy: a new one (built; the sender's older one dropped) or
        the cached one."""
        key = str(go.get("pair", ""))
        if not key.startswith(sender + "/"):
            raise TransferError(f"pair {key!r} does not belong to sender {sender}")
        if go.get("new"):
            with self._guard:
                old = self._pairs.pop(sender, None)
            if old is not None:
                _abort(old.group)
            self._evict(adding=1, keep=sender)
            pair = bounded(lambda: self._make(key, sock), PAIR_TIMEOUT_SECONDS, sock, "p2p pair group")
            with self._guard:
                pair.busy = 1
                self._pairs[sender] = pair
            return pair
        with self._guard:
            cached = self._pairs.get(sender)
            if cached is not None and cached.key == key:
                cached.busy += 1
                return cached
        raise TransferError(
            f"no pair group {key} here (dropped, or the decode engine restarted); the next transfer makes one"
        )

    def _make(self, key: str, sock: socket.socket) -> _Pair:
        device = _device(self.pool)
        # A client of our own store per pair: a store client blocks while it waits, and pairs form at once.
        store = dist.TCPStore(
            "127.0.0.1",
            self._store.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=PAIR_TIMEOUT_SECONDS),
        )
        group = new_pair_group(store, key, 1, device, sock.getsockname()[0])
        _warm_up(group.recv([torch.empty(1, device=device)], 0, 0), device)  # both ends connected
        return _Pair(key, group, store)

    def _pull(self, group: Any, sock: socket.socket, header: dict[str, Any], reg: Registration) -> None:
        pool, blocks = self.pool, reg.blocks
        plan = plan_chunks(
            [pool.unit_bytes(i) for i in range(pool.num_layers)], len(blocks), int(header["chunk_bytes"])
        )
        transfer = header["transfer_id"]
        with transfer_stream(_device(pool)) as synchronize:
            buffers = _staging(pool, plan, blocks)

            def post(index: int) -> tuple[Any, torch.Tensor]:
                layers, part = plan[index]
                staging = buffers[index % len(buffers)][: pool.span_bytes(layers, len(blocks[part]))]
                return group.recv([staging], 0, index), staging

            pending = post(0)
            for index, (layers, part) in enumerate(plan):
                work, staging = pending
                if index + 1 < len(plan):
                    pending = post(
                        index + 1
                    )  # its buffer's previous scatter is done (CPU) or earlier on the stream
                wait_work(work, _device(pool), sock, f"KV transfer {transfer} chunk {index}")
                if not reg.cancelled:
                    pool.scatter_blocks(layers, blocks[part], staging)
            synchronize()
