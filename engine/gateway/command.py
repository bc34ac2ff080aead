"""`moefleet gateway`: the OpenAI-compatible front door of a MoEDeployment, routing to engine groups by load.

    moefleet gateway --backend http://10.0.0.5:8000 --backend http://10.0.0.6:8000    # mixed groups
    moefleet gateway --config /etc/moefleet/gateway/config.json                       # what the operator renders

The config file (schema: moefleet.gateway_schema, shared with the operator) is re-read when it changes, so
scaling groups rewrites a ConfigMap and never restarts the gateway. See docs/gateway.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from moefleet.gateway_schema import ROUTING_POLICIES, GatewayConfig, GatewayConfigError, mixed_config

log = logging.getLogger("moefleet.gateway")
CONFIG_CHECK_SECONDS = 2.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "gateway",
        help="route OpenAI requests to engine groups by load",
        description="The OpenAI-compatible gateway in front of engine groups (mixed, or prefill/decode).",
    )
    parser.add_argument(
        "--config", help="gateway config file (JSON, the operator's ConfigMap); re-read on change"
    )
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="URL",
        help="a mixed engine group's URL (repeatable)",
    )
    parser.add_argument(
        "--prefill", action="append", default=[], metavar="URL", help="a prefill group's URL (repeatable)"
    )
    parser.add_argument(
        "--decode", action="append", default=[], metavar="URL", help="a decode group's URL (repeatable)"
    )
    parser.add_argument(
        "--routing-policy", choices=ROUTING_POLICIES, default=None, help="default: least-load"
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=None, help="default: the config's port, else 8000")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between backend polls")
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="larger request bodies get 413 before they are read; JSON nested deeper than 32 levels gets 400 "
        "(default 8 MiB, the engine's default)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT: refuse new requests (503), let requests in flight finish for up to this long, "
        "then cut them (finish_reason 'abort') and exit 0; a second signal cuts now (default: the config's "
        "drainTimeoutSeconds, else 30)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The config the flags describe; raises CommandError saying what to change."""
    from moefleet.engine.cli import CommandError

    from moefleet.gateway_schema import GroupEndpoint, RoleEndpoints

    sources = [bool(args.config), bool(args.backend), bool(args.prefill or args.decode)]
    if sum(sources) != 1:
        raise CommandError(
            "give exactly one of --config FILE, --backend URL..., or --prefill URL... --decode URL...",
            "mixed groups: moefleet gateway --backend http://HOST:8000; with the operator: --config FILE",
        )
    try:
        if args.config:
            config = GatewayConfig.load(args.config)
        elif args.backend:
            config = mixed_config(args.backend, args.routing_policy or "least-load")
        else:
            if not (args.prefill and args.decode):
                raise CommandError("disaggregated mode needs at least one --prefill URL and one --decode URL")
            roles = {
                role: RoleEndpoints(
                    groups=tuple(GroupEndpoint(name=f"{role}-{i}", url=url) for i, url in enumerate(urls))
                )
                for role, urls in (("prefill", args.prefill), ("decode", args.decode))
            }
            config = GatewayConfig.from_dict(
                {
                    "mode": "disaggregated",
                    "routingPolicy": args.routing_policy or "least-load",
                    "roles": {name: role.to_dict() for name, role in roles.items()},
                },
                source="command line",
            )
    except GatewayConfigError as exc:
        raise CommandError(str(exc), "fix the value named above (docs/gateway.md lists the fields)") from exc
    if args.routing_policy and args.config:
        config = GatewayConfig(**{**config.__dict__, "routing_policy": args.routing_policy})
    return config


async def watch_config(path: str, apply: Any) -> None:
    """Re-read `path` when its modification time or size changes; a broken file keeps the previous config."""

    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    seen = stamp()
    while True:
        await asyncio.sleep(CONFIG_CHECK_SECONDS)
        current = stamp()
        if current == seen:
            continue
        seen = current
        try:
            config = GatewayConfig.load(path)
        except GatewayConfigError as exc:
            log.error("keeping the previous gateway config: %s", exc)
            continue
        apply(config)
        log.info("reloaded the gateway config from %s", path)


def run(args: argparse.Namespace) -> int:
    from moefleet.engine.cli import CommandError
    from moefleet.engine.gateway import drain as gateway_drain
    from moefleet.engine.gateway.app import Gateway, build_gateway_app
    from moefleet.engine.gateway.pool import BackendPool
    from moefleet.engine.server.request_guard import DEFAULT_MAX_REQUEST_BYTES

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    max_request_bytes = getattr(args, "max_request_bytes", None)
    if max_request_bytes is None:
        max_request_bytes = DEFAULT_MAX_REQUEST_BYTES
    if max_request_bytes < 1:
        raise CommandError(f"--max-request-bytes {max_request_bytes} must be a positive integer")
    drain_flag = getattr(args, "drain_timeout", None)
    if drain_flag is not None and drain_flag < 0:
        raise CommandError(f"--drain-timeout {drain_flag:g} must be >= 0 seconds")
    config = config_from_args(args)
    drain = gateway_drain.Drain(
        gateway_drain.drain_timeout_of(drain_flag, config.drain_timeout_s), name=gateway_drain.NAME
    )
    if config.mode == "disaggregated":
        log.info(
            "disaggregated mode: each request is prefilled by a prefill group and its KV sent to a decode group "
            "(engines started with --role prefill / --role decode; a decode group without roles serves requests "
            "whole, see docs/gateway.md)"
        )
    pool = BackendPool(config, poll_interval=args.poll_interval)
    gateway = Gateway(
        pool, max_request_bytes=max_request_bytes
    )  # oversize / deeply nested bodies refused early

    def apply(new: GatewayConfig) -> None:
        pool.configure(new)
        drain.timeout_s = gateway_drain.drain_timeout_of(drain_flag, new.drain_timeout_s)

    reload = (lambda: watch_config(args.config, apply)) if args.config else None
    app = build_gateway_app(gateway, reload)
    port = args.port if args.port is not None else config.port
    groups = sum(len(r.groups) for r in config.roles.values())
    print(
        f"moefleet gateway: {config.mode} mode, {config.routing_policy} routing over {groups} group(s) "
        f"on http://{args.host}:{port}",
        flush=True,
    )
    gateway_drain.serve(app, args.host, port, args.log_level, drain)  # SIGTERM drains (drain.py)
    return 0
