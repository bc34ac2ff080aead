"""Engine roles for prefill/decode disaggregation: the engine client of a single-process `prefill` or `decode`
server (a multi-process group: group_roles.py; the request states of either: rank_agent.py).

A request takes part in a transfer when the gateway sends it with the header `x-moefleet-kv-transfer: <id>`
(both sides) and, to the prefill side, `x-moefleet-kv-target: <host:port>` (the decode server's KV receiver,
read by the gateway from the decode server's GET /v1/pd/bootstrap; with a multi-rank decode group, the
receiver of the DP rank the gateway chose, named to the decode side by `x-moefleet-dp-rank`). Requests
without these headers are served whole, as by a mixed engine. The OpenAI handlers are unchanged:
`pd_headers` (ASGI middleware) puts the headers in a context variable that the engine client reads when the
handler submits the request.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from moefleet.engine.disaggregation.base import create_transfer
from moefleet.engine.disaggregation.rank_agent import (
    DP_RANK_HEADER,
    TARGET_HEADER,
    TRANSFER_HEADER,
    PDRankAgent,
    PDRequest,
)
from moefleet.engine.server.async_engine import LocalEngineClient

log = logging.getLogger(__name__)

ROLES = ("mixed", "prefill", "decode")
__all__ = ["DP_RANK_HEADER", "PDRequest", "TARGET_HEADER", "TRANSFER_HEADER", "PDEngineClient"]

current_pd_request: contextvars.ContextVar[PDRequest | None] = contextvars.ContextVar(
    "moefleet_pd_request", default=None
)


def parse_pd_headers(headers: dict[str, str]) -> PDRequest | None:
    """The transfer a request takes part in, from its (lower-case) headers; None: served whole (pure)."""
    transfer_id = headers.get(TRANSFER_HEADER)
    if not transfer_id:
        return None
    rank = headers.get(DP_RANK_HEADER, "")
    return PDRequest(transfer_id, headers.get(TARGET_HEADER), int(rank) if rank.isdigit() else None)


def pd_headers(app: Any) -> Any:
    """ASGI middleware: expose the transfer headers of an HTTP request to the engine client."""

    async def middleware(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            pd = parse_pd_headers(headers)
            if pd is not None:
                token = current_pd_request.set(pd)
                try:
                    return await app(scope, receive, send)
                finally:
                    current_pd_request.reset(token)
        return await app(scope, receive, send)

    return middleware


class PDEngineClient(LocalEngineClient):
    """A `LocalEngineClient` whose engine plays the prefill or decode role of a disaggregated deployment."""

    _thread_name = "moefleet-engine-pd"

    def __init__(
        self, engine: Any, role: str, kv_host: str = "0.0.0.0", kv_port: int = 0, kv_transfer: str = "auto"
    ):
        if role not in ("prefill", "decode"):
            raise ValueError(f"role {role!r}: PDEngineClient serves the prefill or decode role")
        super().__init__(engine)
        self.role = role
        self.sender, self.receiver = create_transfer(
            engine.model_runner.kv_pool, kv_host, kv_port, backend=kv_transfer
        )
        commands = self._commands
        self.agent = PDRankAgent(engine, role, self.sender, self.receiver, lambda: commands.put(("pd_poll",)))

    def bootstrap(self) -> dict[str, Any]:
        """What the gateway needs to hand this engine's requests over (GET /v1/pd/bootstrap)."""
        port = int(self.receiver.address.rpartition(":")[2])
        return {
            "role": self.role,
            "kv_transfer_backend": self.sender.name,
            "kv_address": self.receiver.address,
            "kv_port": port,
            "dp_size": 1,
            "kv_ports": [port],
            "kv_addresses": [self.receiver.address],
            "kv_nodes": [0],
            "kv_layout": self._engine.model_runner.kv_pool.layout().to_dict(),
        }

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        self.agent.close()

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
            self._deliver_events(self.agent.add(*command[1:]))
        elif kind == "abort" and self.agent.abort(command[1]):
            pass
        elif kind == "pd_poll":
            self._deliver_events(self.agent.poll())
        else:
            super()._handle(command)

    def _deliver_events(self, events: list[Any]) -> None:
        if events:
            self._deliver_all(events)

    def _step(self) -> None:
        super()._step()
        self.agent.start_sends()


def make_router(client: Any) -> Any:
    """GET /v1/pd/bootstrap: this server's role and KV receiver address (404 on a mixed server)."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    router = APIRouter()

    @router.get("/v1/pd/bootstrap")
    async def bootstrap() -> JSONResponse:
        bootstrap = getattr(client, "bootstrap", None)
        if getattr(client, "role", "mixed") not in ("prefill", "decode") or bootstrap is None:
            return JSONResponse({"role": "mixed"}, status_code=404)
        return JSONResponse(bootstrap())

    return router
