"""Engine roles for prefill/decode disaggregation: the engine client of a `prefill` or `decode` server.

A request takes part in a transfer when the gateway sends it with the header `x-moefleet-kv-transfer: <id>`
(both sides) and, to the prefill side, `x-moefleet-kv-target: <host:port>` (the decode server's KV receiver,
read by the gateway from the decode server's GET /v1/pd/bootstrap). Requests without these headers are
served whole, as by a mixed engine. The OpenAI handlers are unchanged: `pd_headers` (ASGI middleware) puts
the headers in a context variable that `PDEngineClient` reads when the handler submits the request.

- decode: the request is added in state WAITING_FOR_KV with blocks reserved for its prompt and registered
  with the KV receiver; when the KV and the first token land it decodes and streams as usual.
- prefill: the request computes its prompt and samples the first token, then waits in state SENDING_KV while
  a sender thread pushes its blocks; they are freed once the decode side acknowledged (the HTTP answer is the
  first token) or the transfer failed (an error).
Aborts (client gone) never free blocks that a transfer is reading or writing: they wait for it to end.
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from moefleet.engine.disaggregation.base import TransferError, TransferResult, create_transfer
from moefleet.engine.server.async_engine import EngineError, LocalEngineClient, RequestRejectedError

log = logging.getLogger(__name__)

ROLES = ("mixed", "prefill", "decode")
TRANSFER_HEADER = "x-moefleet-kv-transfer"
TARGET_HEADER = "x-moefleet-kv-target"


@dataclass(frozen=True, slots=True)
class PDRequest:
    transfer_id: str
    target: str | None  # prefill side: the decode receiver's address


current_pd_request: contextvars.ContextVar[PDRequest | None] = contextvars.ContextVar(
    "moefleet_pd_request", default=None
)


def pd_headers(app: Any) -> Any:
    """ASGI middleware: expose the transfer headers of an HTTP request to the engine client."""

    async def middleware(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            transfer_id = headers.get(TRANSFER_HEADER)
            if transfer_id:
                token = current_pd_request.set(PDRequest(transfer_id, headers.get(TARGET_HEADER)))
                try:
                    return await app(scope, receive, send)
                finally:
                    current_pd_request.reset(token)
        return await app(scope, receive, send)

    return middleware


class PDEngineClient(LocalEngineClient):
    """A `LocalEngineClient` whose engine plays the prefill or decode role of a disaggregated deployment."""

    _thread_name = "moefleet-engine-pd"

    def __init__(self, engine: Any, role: str, kv_host: str = "0.0.0.0", kv_port: int = 0):
        if role not in ("prefill", "decode"):
            raise ValueError(f"role {role!r}: PDEngineClient serves the prefill or decode role")
        super().__init__(engine)
        self.role = role
        self.sender, self.receiver = create_transfer(engine.model_runner.kv_pool, kv_host, kv_port)
        self._send_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moefleet-kv-send")
        # Engine-thread state: transfers in flight by request id, and aborts that wait for their transfer.
        self._transfers: dict[str, PDRequest] = {}
        self._abort_after_transfer: set[str] = set()

    def bootstrap(self) -> dict[str, Any]:
        """What the gateway needs to hand this engine's requests over (GET /v1/pd/bootstrap)."""
        return {
            "role": self.role,
            "kv_transfer_backend": self.sender.name,
            "kv_address": self.receiver.address,
            "kv_port": int(self.receiver.address.rpartition(":")[2]),
            "kv_layout": self._engine.model_runner.kv_pool.layout().to_dict(),
        }

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        self._send_threads.shutdown(wait=False, cancel_futures=True)
        self.receiver.close()

    # ---- event-loop side --------------------------------------------------------------------------------

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        pd = current_pd_request.get()
        if pd is None:
            super()._submit_add(request_id, prompt_token_ids, sampling_params)
        else:
            self._commands.put(("add_pd", request_id, prompt_token_ids, sampling_params, pd))

    # ---- engine-thread side -----------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return self._dead is None and bool(self._engine.has_runnable_requests())

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add_pd":
            self._add(*command[1:])
        elif kind == "abort" and command[1] in self._transfers:
            self._abort(command[1])
        elif kind == "landed":
            self._landed(command[1], command[2])
        elif kind == "sent":
            self._sent(command[1], command[2])
        else:
            super()._handle(command)

    def _add(self, request_id: str, prompt: list[int], params: Any, pd: PDRequest) -> None:
        if self.role == "prefill" and not pd.target:
            error = RequestRejectedError(
                f"{TARGET_HEADER} is missing: a prefill server needs the decode side"
            )
            self._deliver(request_id, error, last=True)
            return
        try:
            self._engine.add_request(
                request_id, prompt, params, kv_mode="send" if self.role == "prefill" else "receive"
            )
        except (ValueError, TypeError) as exc:
            if self.role == "decode":
                self.receiver.refuse(pd.transfer_id, f"the decode server rejected the request: {exc}")
            self._deliver(request_id, RequestRejectedError(str(exc)), last=True)
            return
        self._transfers[request_id] = pd
        if self.role == "decode":
            commands = self._commands

            def on_landed(result: TransferResult) -> None:
                commands.put(("landed", request_id, result))

            try:
                self.receiver.register(
                    pd.transfer_id, self._engine.kv_blocks(request_id), len(prompt), on_landed
                )
            except ValueError as exc:
                del self._transfers[request_id]
                self._engine.abort_request(request_id)
                self._deliver(request_id, RequestRejectedError(str(exc)), last=True)

    def _abort(self, request_id: str) -> None:
        pd = self._transfers[request_id]
        sched = self._engine.scheduler
        if self.role == "decode":
            if request_id in sched.waiting_for_kv and not self.receiver.cancel(pd.transfer_id):
                self._abort_after_transfer.add(request_id)  # the receiver is writing its blocks
                return
        elif request_id in sched.sending_kv:
            self._abort_after_transfer.add(request_id)  # the sender is reading its blocks
            return
        del self._transfers[request_id]
        self._engine.abort_request(request_id)

    def _landed(self, request_id: str, result: TransferResult) -> None:
        self._transfers.pop(request_id, None)
        if request_id in self._abort_after_transfer or result.error is not None or result.first_token is None:
            self._abort_after_transfer.discard(request_id)
            self._engine.abort_request(request_id)
            if result.error is not None:
                self._deliver(request_id, EngineError(f"KV transfer failed: {result.error}"), last=True)
            return
        output = self._engine.kv_landed(request_id, result.first_token)
        self._deliver(request_id, output, last=bool(output.finished))

    def _step(self) -> None:
        super()._step()
        for seq in self._engine.take_kv_sends():
            pd = self._transfers[seq.request_id]
            assert pd.target is not None
            args = (seq.request_id, pd, list(seq.block_table), seq.num_prompt_tokens, seq.token_ids[-1])
            self._send_threads.submit(self._send, *args)

    def _send(self, request_id: str, pd: PDRequest, blocks: list[int], num_tokens: int, first: int) -> None:
        """Sender thread: push the blocks, then tell the engine thread how it went."""
        error = None
        try:
            assert pd.target is not None
            self.sender.send(pd.target, pd.transfer_id, blocks, num_tokens, first)
        except TransferError as exc:
            error = str(exc)
        except Exception as exc:  # never leave the request parked
            log.exception("KV send of %s failed", request_id)
            error = f"{type(exc).__name__}: {exc}"
        self._commands.put(("sent", request_id, error))

    def _sent(self, request_id: str, error: str | None) -> None:
        self._transfers.pop(request_id, None)
        if request_id in self._abort_after_transfer or error is not None:
            self._abort_after_transfer.discard(request_id)
            self._engine.abort_request(request_id)
            if error is not None:
                log.warning("KV transfer of %s failed: %s", request_id, error)
                self._deliver(request_id, EngineError(f"KV transfer failed: {error}"), last=True)
            return
        self._deliver(request_id, self._engine.kv_sent(request_id), last=True)


def make_router(client: Any) -> Any:
    """GET /v1/pd/bootstrap: this server's role and KV receiver address (404 on a mixed server)."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    router = APIRouter()

    @router.get("/v1/pd/bootstrap")
    async def bootstrap() -> JSONResponse:
        if not isinstance(client, PDEngineClient):
            return JSONResponse({"role": "mixed"}, status_code=404)
        return JSONResponse(client.bootstrap())

    return router
