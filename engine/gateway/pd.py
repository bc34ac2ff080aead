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
Retries (before anything reached the client): a decode group that refuses (503 `kv_cache_full`: no KV room
now; another 502/503/504, e.g. draining) or cannot be reached, and a prefill group that fails (unreachable, an
error answer, a failed transfer), end the attempt: the other leg is cancelled (which aborts the request and
frees its KV on that side) and the next (decode, prefill) pair comes from `routing.next_pd_attempt`, which
leaves out only the side that failed. When every prefill group failed, a decode group serves the request whole;
when no decode group is left, 503 in OpenAI form with Retry-After (`kv_cache_full` when all were full). A 4xx
from either leg is the request's fault and is relayed as is. After the first token, the stream ends with an
error event (app.py).
Requests the roles cannot split (n > 1, best_of, echo, prompt_logprobs, structured outputs, tools), and all requests while no prefill group
is ready, are served whole by a decode group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from fastapi.responses import JSONResponse, Response
from moefleet.engine.gateway.pool import Backend
from moefleet.engine.gateway.routing import NoBackendError, next_pd_attempt, pd_attempt_limit, pick_dp_rank
from moefleet.engine.gateway.upstream import Busy, Full, UpstreamError, UpstreamUnreachable
from moefleet.engine.server.errors import KV_CACHE_FULL_CODE, error_body

if TYPE_CHECKING:
    from moefleet.engine.gateway.app import Gateway

log = logging.getLogger("moefleet.gateway")

TRANSFER_HEADER = "x-moefleet-kv-transfer"
TARGET_HEADER = "x-moefleet-kv-target"
DP_RANK_HEADER = "x-moefleet-dp-rank"
BOOTSTRAP_PATH = "/v1/pd/bootstrap"
# A request no decode group could take (all full, or none left) is answered 503 with this Retry-After.
RETRY_AFTER_SECONDS = 1
# How long an error answer of the decode leg waits for the prefill leg's outcome (to know whom to blame).
PREFILL_SETTLE_SECONDS = 2.0
# Fields whose meaning needs state the decode side would not have after a hand-over (served whole there).
# `logprobs` / `top_logprobs` split: the prefill side ships the first token's entry with the KV.
_WHOLE_ON_DECODE = (
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
        """The client's answer, or None when the request should be served whole by a decode group.

        Tries (decode, prefill) pairs from `next_pd_attempt` until one gets the first token to the client: a
        decode group that refuses (full, draining) or cannot be reached, and a prefill group that fails before
        the first token, are left out of the next attempt (only the side that failed); when every prefill
        group failed, a decode group serves the request whole; when no decode group is left, 503."""
        gw = self.gateway
        if not splittable(body):
            return None
        failed_decode: set[str] = set()
        failed_prefill: set[str] = set()
        errors: list[str] = []
        full = 0  # decode groups that refused for want of KV room
        limit = pd_attempt_limit(gw.pool.views())
        for _ in range(limit):
            try:
                attempt = next_pd_attempt(
                    gw.pool.views(),
                    gw.pool.config.routing_policy,
                    failed_decode=frozenset(failed_decode),
                    failed_prefill=frozenset(failed_prefill),
                    turn=next(gw.turns),
                    prefix_key=prefix_key,
                )
            except NoBackendError as exc:
                return self._unavailable(str(exc), errors, full)
            if attempt.prefill is None:
                if errors:
                    log.warning("no prefill group left (%s): serving the request whole", "; ".join(errors))
                return None  # no prefill group ready (or every one failed): decode groups serve it whole
            outcome = await self._attempt(
                gw.pool.backends[attempt.decode], gw.pool.backends[attempt.prefill], path, raw, body, headers
            )
            if isinstance(outcome, Failed):
                errors.append(str(outcome))
                (failed_decode if outcome.side == "decode" else failed_prefill).add(outcome.group)
                full += outcome.full
                gw.metrics.retries.labels(outcome.side).inc()
                continue
            return outcome
        return self._unavailable(f"no group could take the request after {limit} attempts", errors, full)

    async def _attempt(
        self,
        decode: Backend,
        prefill: Backend,
        path: str,
        raw: bytes,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> Response | Failed | None:
        """One try over `decode` and `prefill`: the client's answer, None (serve whole: the decode group has
        no roles), or which side failed before the first token (both legs are cancelled by then, which
        aborts the request and frees its KV on each side)."""
        gw = self.gateway
        try:
            boot = await self.bootstrap(decode)
        except (httpx.HTTPError, ValueError) as exc:
            gw.pool.mark_failed(decode.name, str(exc))
            return Failed("decode", decode.name, f"did not answer {BOOTSTRAP_PATH} ({exc})")
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
            # When both ended, the decode leg's outcome is looked at first: a decode group that refused or
            # could not be reached also makes the prefill leg's push fail, and is the one to blame.
            failure = prefill_task.result() if decode_task not in done else None
            if failure is not None:
                await _cancel(decode_task)
                if isinstance(failure, Response):  # the request itself is bad (4xx): say so as the engine did
                    return gw._answer(failure)
                return Failed("prefill", prefill.name, str(failure))
            result = await decode_task
        except BaseException:
            await _cancel(decode_task)
            await _cancel(prefill_task)
            raise
        if isinstance(result, str) or result.status_code >= 500:
            # Refused (full, draining), unreachable, or failed before its first token (an error answer, e.g. a
            # failed transfer): a transport failure or refusal is the decode group's; an error answer is the
            # prefill group's when its leg failed too (a broken transfer fails both), else the decode group's.
            if not isinstance(result, str):  # a failed transfer ends both legs: let the prefill answer come
                await asyncio.wait({prefill_task}, timeout=PREFILL_SETTLE_SECONDS)
            prefill_failure = await _settle(prefill_task) if prefill_task.done() else None
            await _cancel(prefill_task)
            if not isinstance(result, str) and isinstance(prefill_failure, str):
                return Failed("prefill", prefill.name, prefill_failure)
            if isinstance(result, Full):
                return Failed("decode", decode.name, str(result), full=True)
            if isinstance(result, str):
                if not isinstance(result, Busy):
                    gw.pool.mark_failed(decode.name, result)
                return Failed("decode", decode.name, result)
            return Failed("decode", decode.name, f"answered {result.status_code}")
        if result.status_code != 200:  # refused by the decode group (4xx): the prefill leg has nowhere to go
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

    def _unavailable(self, why: str, errors: list[str], full: int) -> Response:
        """503 with Retry-After: no decode group could take the request before its first token."""
        tried = "; ".join(errors)
        if full and full == len(errors):
            message = (
                f"no decode group has KV-cache room for this prompt now ({tried}); retry in "
                f"{RETRY_AFTER_SECONDS} s, or send a shorter prompt"
            )
            code = KV_CACHE_FULL_CODE
        elif errors:
            message = f"no group could take the request before its first token ({tried}); retry in {RETRY_AFTER_SECONDS} s"
            code = "no_backend_available"
        else:
            message, code = why, "no_backend_available"
        if errors:
            log.warning("disaggregated request failed before its first token: %s", message)
        response = JSONResponse(
            error_body(message, 503, code=code),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
        return self.gateway._answer(response)


@dataclass(frozen=True)
class Failed:
    """An attempt that failed before the first token: which side and group, why, and whether it was a decode
    group's "no KV room" refusal."""

    side: str  # "decode" or "prefill"
    group: str
    why: str
    full: bool = False

    def __str__(self) -> str:
        return f"{self.side} group {self.group}: {self.why}"


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


async def _settle(task: asyncio.Task) -> Any:
    with contextlib.suppress(BaseException):
        return task.result()
    return None


async def _cancel(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task
