"""Disaggregated mode: one request goes to a decode group and a prefill group, and the KV moves between them.

Handshake (engine side: engine/disaggregation/roles.py):
  1. Pick a decode group and a prefill group (routing.py, by load). Read the decode group's KV receivers
     (one per DP rank) from its GET /v1/pd/bootstrap (cached per group; a group that answers 404 is not a
     `--role decode` engine: the request is then served whole there, as before engines had roles), and pick
     the DP rank inside it with the most KV headroom (`pick_dp_rank`, from the per-rank series of its
     /metrics plus what this gateway placed there since).
  2. Send the request to the decode group with `x-moefleet-kv-transfer: <id>` and `x-moefleet-dp-rank: <r>`:
     rank r reserves KV blocks for the prompt and waits for them; its answer (or stream) is what the client
     gets.
  3. At the same time send it, non-streaming, to the prefill group with the same id and
     `x-moefleet-kv-target: <rank r's receiver>`: it computes the prompt and the first token and pushes the KV; its
     answer arrives once the decode group acknowledged (`moefleet_gateway_kv_transfer_seconds`).
A failure of either leg before the decode group's first byte cancels the other leg (which aborts the request
and frees its KV on that side) and answers 502/503 in OpenAI form; a prefill group that cannot be connected to
(it computed nothing) leaves the pool and the request is served whole by a decode group instead.
Requests the roles cannot split (n > 1, logprobs, structured outputs), and all requests while no prefill group
is ready, are served whole by a decode group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from fastapi.responses import JSONResponse, Response
from moefleet.engine.gateway.pool import Backend
from moefleet.engine.gateway.routing import NoBackendError, pick_backend, pick_dp_rank
from moefleet.engine.gateway.upstream import UpstreamError, UpstreamUnreachable
from moefleet.engine.server.errors import error_body

if TYPE_CHECKING:
    from moefleet.engine.gateway.app import Gateway

log = logging.getLogger("moefleet.gateway")

TRANSFER_HEADER = "x-moefleet-kv-transfer"
TARGET_HEADER = "x-moefleet-kv-target"
DP_RANK_HEADER = "x-moefleet-dp-rank"
BOOTSTRAP_PATH = "/v1/pd/bootstrap"
# Fields whose meaning needs state the decode side would not have after a hand-over (served whole there).
_WHOLE_ON_DECODE = (
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "tools",
    "best_of",
)


def splittable(body: dict[str, Any]) -> bool:
    """Whether a request can be split between a prefill and a decode group (pure)."""
    if body.get("n") not in (None, 1):
        return False
    return not any(body.get(name) not in (None, False, 0) for name in _WHOLE_ON_DECODE)


class Unreachable(str):
    """The prefill group could not be connected to (so it computed nothing): why."""


class PDRelay:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self._bootstrap: dict[str, dict[str, Any] | None] = {}  # decode group url -> answer (None: no roles)
        self._background: set[asyncio.Task] = set()

    def pick(self, role: str, prefix_key: str) -> Backend:
        gw = self.gateway
        view = pick_backend(
            gw.pool.views(),
            role,
            gw.pool.config.routing_policy,
            exclude=frozenset(),
            turn=next(gw.turns),
            prefix_key=prefix_key,
        )
        return gw.pool.backends[view.name]

    async def bootstrap(self, backend: Backend) -> dict[str, Any] | None:
        if backend.url not in self._bootstrap:
            answer = await self.gateway.client.get(backend.url + BOOTSTRAP_PATH, timeout=5.0)
            if answer.status_code == 404:
                self._bootstrap[backend.url] = None
                log.warning(
                    "decode group %s has no engine roles (%s answered 404): requests are served whole there",
                    backend.name,
                    BOOTSTRAP_PATH,
                )
            else:
                answer.raise_for_status()
                self._bootstrap[backend.url] = answer.json()
        return self._bootstrap[backend.url]

    async def relay(
        self, path: str, raw: bytes, body: dict[str, Any], headers: dict[str, str], prefix_key: str
    ) -> Response | None:
        """The client's answer, or None when the request should be served whole by a decode group."""
        gw = self.gateway
        if not splittable(body):
            return None
        try:
            prefill = self.pick("prefill", prefix_key)
        except NoBackendError:
            return None  # no prefill group ready: decode groups serve whole requests meanwhile
        try:
            decode = self.pick("decode", prefix_key)
        except NoBackendError as exc:
            return gw._answer(JSONResponse(error_body(str(exc), 503), status_code=503))
        try:
            boot = await self.bootstrap(decode)
        except (httpx.HTTPError, ValueError) as exc:
            gw.pool.mark_failed(decode.name, str(exc))
            message = f"decode group {decode.name} did not answer {BOOTSTRAP_PATH} ({exc}); retry the request"
            return gw._answer(JSONResponse(error_body(message, 503), status_code=503))
        if boot is None:
            return None
        transfer_id = uuid.uuid4().hex
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        rank, target = decode_target(decode, boot)
        decode.rank_opened[rank] = decode.rank_opened.get(rank, 0) + 1
        prefill_headers = {**headers, TRANSFER_HEADER: transfer_id, TARGET_HEADER: target}
        decode_headers = {**headers, TRANSFER_HEADER: transfer_id, DP_RANK_HEADER: str(rank)}
        prefill_task = asyncio.create_task(
            self._prefill(prefill, path, json.dumps(prefill_body).encode(), prefill_headers)
        )
        decode_task = asyncio.create_task(
            gw._try(decode, path, raw, decode_headers, bool(body.get("stream")))
        )
        try:
            done, _ = await asyncio.wait({prefill_task, decode_task}, return_when=asyncio.FIRST_COMPLETED)
            failure = prefill_task.result() if prefill_task in done else None
            if failure is not None:
                await _cancel(decode_task)
                if isinstance(failure, Response):  # the request itself is bad (4xx): say so as the engine did
                    return gw._answer(failure)
                if isinstance(failure, Unreachable):  # nothing computed yet: a decode group serves it whole
                    log.warning(
                        "prefill group %s unreachable (%s): serving the request whole", prefill.name, failure
                    )
                    return None
                return self._fail(f"prefill group {prefill.name}: {failure}")
            result = await decode_task
        except BaseException:
            await _cancel(decode_task)
            await _cancel(prefill_task)
            raise
        if isinstance(result, str):
            await _cancel(prefill_task)
            gw.pool.mark_failed(decode.name, result)
            return self._fail(f"decode group {decode.name}: {result}")
        if result.status_code != 200:  # refused by the decode group: the prefill leg has nowhere to go
            await _cancel(prefill_task)
            return result
        if not prefill_task.done():  # it answers right after the decode side acknowledged: let it finish
            self._background.add(prefill_task)
            prefill_task.add_done_callback(self._background.discard)
        return result

    async def _prefill(
        self, backend: Backend, path: str, raw: bytes, headers: dict[str, str]
    ) -> str | Response | None:
        """Run the prefill leg: None when it succeeded, its answer when it refused the request (4xx), else
        why it failed."""
        gw = self.gateway
        started = time.perf_counter()
        backend.in_flight += 1
        answer = None
        try:
            answer = await gw.upstream.post(backend.url + path, raw, headers)
            content = await answer.read()
        except UpstreamUnreachable as exc:  # never reached it: nothing was computed
            gw.pool.mark_failed(backend.name, str(exc))
            return Unreachable(str(exc))
        except UpstreamError as exc:
            gw.pool.mark_failed(backend.name, str(exc))
            return str(exc)
        finally:
            backend.in_flight -= 1
            if answer is not None:
                await answer.close(finished=True)
        if 400 <= answer.status_code < 500:
            return Response(content, status_code=answer.status_code, media_type=answer.content_type)
        if answer.status_code != 200:
            return f"answered {answer.status_code}: {content.decode(errors='replace')[:300]}"
        gw.metrics.kv_transfer_seconds.observe(time.perf_counter() - started)
        return None

    def _fail(self, why: str) -> Response:
        message = f"disaggregated request failed before its first token ({why}); retry the request"
        log.warning(message)
        return self.gateway._answer(JSONResponse(error_body(message, 502), status_code=502))


def decode_target(decode: Backend, boot: dict[str, Any]) -> tuple[int, str]:
    """The DP rank of the decode group a request goes to (most KV headroom) and that rank's KV receiver as
    the gateway reaches it: a rank on the group's first node at the group URL's host, others at the address
    they announced. A single-process decode server is rank 0."""
    ports = [int(p) for p in boot.get("kv_ports") or [boot["kv_port"]]]
    nodes = [int(n) for n in boot.get("kv_nodes") or [0] * len(ports)]
    addresses = list(boot.get("kv_addresses") or [boot.get("kv_address", "")] * len(ports))
    rank = pick_dp_rank(decode.rank_views(len(ports))) if len(ports) > 1 else 0
    if nodes[rank] == 0:
        return rank, f"{urlsplit(decode.url).hostname}:{ports[rank]}"
    return rank, str(addresses[rank])


async def _cancel(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task
