"""One rank's side of prefill/decode disaggregation: the request states around a KV transfer on one engine.

Used by both engine clients of a role: `PDEngineClient` (a single-process server, roles.py) and every rank of
a multi-process group (group_roles.py, driven by `DPEngineLoop` at step boundaries). It never delivers
anything itself: each call returns events `(request_id, RequestOutput | Exception, last)` for its caller to
deliver (the HTTP queues of a single-process server, the step exchange of a group).

- decode: `add` reserves blocks for the prompt (state WAITING_FOR_KV) and registers them with this rank's KV
  receiver; when the KV and the first token land (`poll`) the request decodes and streams as usual.
- prefill: `add` queues the prompt; once it is computed and the first token sampled the request waits in
  state SENDING_KV while a sender thread pushes its blocks (with the first token and, when the request asked
  for logprobs, the first token's logprob entry, which the decode side emits with it) (`start_sends`, after each engine step); they are
  freed once the decode side acknowledged (the answer is the first token) or the transfer failed (an error).
Aborts never free blocks that a transfer is reading or writing: they wait for it to end.
All methods run on the engine's thread; the receiver and sender threads only queue notifications for `poll`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from moefleet.engine.disaggregation.base import KVReceiver, KVSender, TransferError, TransferResult
from moefleet.engine.logprobs import from_wire, to_wire
from moefleet.engine.scheduler import KVCacheFullError
from moefleet.engine.server.async_engine import EngineError, NoRoomError, RequestRejectedError

log = logging.getLogger(__name__)

TRANSFER_HEADER = "x-moefleet-kv-transfer"
TARGET_HEADER = "x-moefleet-kv-target"
DP_RANK_HEADER = "x-moefleet-dp-rank"

Event = tuple[str, Any, bool]  # (request id, RequestOutput or an exception, last event of the request)


@dataclass(frozen=True, slots=True)
class PDRequest:
    transfer_id: str
    target: str | None  # prefill side: the decode receiver's address
    dp_rank: int | None = None  # decode side of a group: the rank whose receiver the prefill side targets


class PDRankAgent:
    def __init__(
        self,
        engine: Any,
        role: str,
        sender: KVSender,
        receiver: KVReceiver,
        notify: Callable[[], None] | None = None,
    ):
        """`notify()` is called (from a transfer thread) when `poll` has something to do."""
        if role not in ("prefill", "decode"):
            raise ValueError(f"role {role!r}: a PD agent serves the prefill or decode role")
        self.engine, self.role, self.sender, self.receiver = engine, role, sender, receiver
        self._notify = notify or (lambda: None)
        self._send_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moefleet-kv-send")
        self._notifications: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._transfers: dict[str, PDRequest] = {}  # requests whose transfer has not ended, by request id
        self._abort_after_transfer: set[str] = set()

    def owns(self, request_id: str) -> bool:
        return request_id in self._transfers

    @property
    def num_transfers(self) -> int:
        return len(self._transfers)

    def add(self, request_id: str, prompt: list[int], params: Any, pd: PDRequest) -> list[Event]:
        if self.role == "prefill" and not pd.target:
            error = RequestRejectedError(
                f"{TARGET_HEADER} is missing: a prefill server needs the decode side"
            )
            return [(request_id, error, True)]
        try:
            self.engine.add_request(
                request_id, prompt, params, kv_mode="send" if self.role == "prefill" else "receive"
            )
        except (ValueError, TypeError) as exc:
            if self.role == "decode":
                self.receiver.refuse(pd.transfer_id, f"the decode server rejected the request: {exc}")
            refusal = NoRoomError if isinstance(exc, KVCacheFullError) else RequestRejectedError
            return [(request_id, refusal(str(exc)), True)]
        self._transfers[request_id] = pd
        if self.role == "decode":
            notifications, notify = self._notifications, self._notify

            def on_landed(result: TransferResult) -> None:
                notifications.put(("landed", request_id, result))
                notify()

            try:
                self.receiver.register(
                    pd.transfer_id, self.engine.kv_blocks(request_id), len(prompt), on_landed
                )
            except ValueError as exc:
                del self._transfers[request_id]
                self.engine.abort_request(request_id)
                return [(request_id, RequestRejectedError(str(exc)), True)]
        return []

    def abort(self, request_id: str) -> bool:
        """Abort a request of this agent (False: not one of its transfers; abort it in the engine as usual).
        The engine reports the abort in its next step."""
        pd = self._transfers.get(request_id)
        if pd is None:
            return False
        sched = self.engine.scheduler
        if self.role == "decode":
            if request_id in sched.waiting_for_kv and not self.receiver.cancel(pd.transfer_id):
                self._abort_after_transfer.add(request_id)  # the receiver is writing its blocks
                return True
        elif request_id in sched.sending_kv:
            self._abort_after_transfer.add(request_id)  # the sender is reading its blocks
            return True
        del self._transfers[request_id]
        self.engine.abort_request(request_id)
        return True

    def poll(self) -> list[Event]:
        """Transfers that ended since the last call, as events (call before each engine step)."""
        events: list[Event] = []
        while True:
            try:
                kind, request_id, outcome = self._notifications.get_nowait()
            except queue.Empty:
                return events
            if kind == "landed":
                events += self._landed(request_id, outcome)
            else:
                events += self._sent(request_id, outcome)

    def start_sends(self) -> None:
        """Prefill side, after each engine step: push the KV of every request whose prompt just finished."""
        for seq in self.engine.take_kv_sends():
            pd = self._transfers[seq.request_id]
            assert pd.target is not None
            first_logprob = None if seq.new_logprob is None else to_wire(seq.new_logprob)
            args = (seq.request_id, pd, list(seq.block_table), seq.num_prompt_tokens, seq.token_ids[-1])
            self._send_threads.submit(self._send, *args, first_logprob)

    def close(self) -> None:
        self._send_threads.shutdown(wait=False, cancel_futures=True)
        self.sender.close()
        self.receiver.close()

    def _landed(self, request_id: str, result: TransferResult) -> list[Event]:
        self._transfers.pop(request_id, None)
        if request_id in self._abort_after_transfer or result.error is not None or result.first_token is None:
            self._abort_after_transfer.discard(request_id)
            self.engine.abort_request(request_id)
            if result.error is not None:
                return [(request_id, EngineError(f"KV transfer failed: {result.error}"), True)]
            return []
        try:
            output = self.engine.kv_landed(request_id, result.first_token, from_wire(result.first_logprob))
        except ValueError as exc:  # a prefill engine that does not ship logprobs (older than the decode one)
            self.engine.abort_request(request_id)
            return [(request_id, EngineError(f"KV transfer incomplete: {exc}"), True)]
        return [(request_id, output, bool(output.finished))]

    def _send(
        self,
        request_id: str,
        pd: PDRequest,
        blocks: list[int],
        num_tokens: int,
        first: int,
        first_logprob: dict[str, Any] | None,
    ) -> None:
        """Sender thread: push the blocks (and the first token's logprob entry, when asked), then tell the
        engine thread how it went."""
        error = None
        try:
            assert pd.target is not None
            self.sender.send(pd.target, pd.transfer_id, blocks, num_tokens, first, first_logprob)
        except TransferError as exc:
            error = str(exc)
        except Exception as exc:  # never leave the request parked
            log.exception("KV send of %s failed", request_id)
            error = f"{type(exc).__name__}: {exc}"
        self._notifications.put(("sent", request_id, error))
        self._notify()

    def _sent(self, request_id: str, error: str | None) -> list[Event]:
        self._transfers.pop(request_id, None)
        if request_id in self._abort_after_transfer or error is not None:
            self._abort_after_transfer.discard(request_id)
            self.engine.abort_request(request_id)
            if error is not None:
                log.warning("KV transfer of %s failed: %s", request_id, error)
                return [(request_id, EngineError(f"KV transfer failed: {error}"), True)]
            return []
        output = self.engine.kv_sent(request_id)
        return [(request_id, output, True)]
