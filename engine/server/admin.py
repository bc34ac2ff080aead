"""Admin routes of `moefleet serve` (front end, rank 0): EPLB state and on-demand rebalance.

    GET  /admin/eplb            balancedness (mean over MoE layers of mean/max per-GPU load in the current
                                window, group-wide), per_layer, window_steps, rebalances, placement summary
    POST /admin/eplb/rebalance  rebalance at the next step boundary; answers when done with
                                balancedness_before, predicted_balancedness, pause_seconds, moved_experts

Every admin request needs `Authorization: Bearer <token>`; the token comes from `--admin-token-file F` or
the env MOEFLEET_ADMIN_TOKEN. Without a configured token every admin request is refused (403), a missing
bearer is 401 and a wrong one 403, all in OpenAI's error shape. Both routes run as commands on every rank
(an all-reduce of the load window; the weight moves), see `moefleet.engine.eplb.controller`.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from moefleet.engine.server.errors import OpenAIError

ENV_ADMIN_TOKEN = "MOEFLEET_ADMIN_TOKEN"
READ_TIMEOUT_S = 60.0
REBALANCE_TIMEOUT_S = 600.0


def admin_token(token_file: str | None, env: Any = os.environ) -> str | None:
    """The admin bearer token: the file's content (stripped) if given, else MOEFLEET_ADMIN_TOKEN, else None."""
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ValueError(f"--admin-token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--admin-token-file {token_file} is empty: put the admin bearer token in it")
        return token
    return env.get(ENV_ADMIN_TOKEN) or None


def _authorize(token: str | None, request: Request) -> None:
    if token is None:
        raise OpenAIError(
            "admin routes are disabled: start moefleet serve with --admin-token-file FILE or set "
            f"{ENV_ADMIN_TOKEN}",
            403,
            code="admin_disabled",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise OpenAIError(
            "admin routes need an 'Authorization: Bearer <admin token>' header", 401, code="unauthorized"
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise OpenAIError("the admin bearer token is wrong", 403, code="forbidden")


def _controller(find: Callable[[], Any]) -> Any:
    eplb = find()
    if eplb is None:
        raise OpenAIError(
            "EPLB is not active on this server: start a multi-process group with --num-redundant-experts N, "
            "--eplb or --eplb-interval-steps K",
            409,
            code="eplb_inactive",
        )
    return eplb


async def _run(eplb: Any, kind: str, timeout_s: float) -> Any:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(eplb.submit(kind)), timeout_s)
    except TimeoutError:
        raise OpenAIError(f"EPLB {kind} did not finish within {timeout_s:.0f} s", 504) from None
    except Exception as exc:  # e.g. the group stopped (the controller fails what is pending)
        raise OpenAIError(f"EPLB {kind} failed: {type(exc).__name__}: {exc}", 503) from None


def make_admin_router(token: str | None, find_controller: Callable[[], Any] | None = None) -> APIRouter:
    """Routes under /admin, guarded by `token`; `find_controller` gives this process's EPLBController."""
    if find_controller is None:
        from moefleet.engine.eplb.controller import current

        find_controller = current
    find: Callable[[], Any] = find_controller
    router = APIRouter()

    @router.get("/admin/eplb")
    async def eplb_state(request: Request) -> JSONResponse:
        _authorize(token, request)
        eplb = _controller(find)
        if not eplb.accepts_commands:  # not the front end: its last group-wide reading
            return JSONResponse(eplb.state())
        return JSONResponse(await _run(eplb, "read", READ_TIMEOUT_S))

    @router.post("/admin/eplb/rebalance")
    async def eplb_rebalance(request: Request) -> JSONResponse:
        _authorize(token, request)
        eplb = _controller(find)
        if not eplb.accepts_commands:
            raise OpenAIError("rebalances are requested on the group's front end (node 0)", 409)
        return JSONResponse(await _run(eplb, "rebalance", REBALANCE_TIMEOUT_S))

    return router
