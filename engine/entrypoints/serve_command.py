"""`moefleet serve` building blocks: flags, fast checks, engine construction, the uvicorn serve loop.

The command itself (`run`) is in serve.py, which picks one process or a group (group_serve.py); both
import from here and this module imports neither, so there is no import cycle.

Order matters for clear failures: arguments are validated and the port is bound *before* the model loads,
so a typo or a busy port fails in a second with exit code 2 instead of after minutes of loading.
Multi-process flags default from MOEFLEET_NNODES / MOEFLEET_NODE_RANK / MOEFLEET_NPROC_PER_NODE /
MOEFLEET_MASTER_ADDR / MOEFLEET_MASTER_PORT (then MASTER_ADDR / MASTER_PORT) so an operator can inject them
as environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import os
import socket
import sys
import threading
from typing import Any

from moefleet.engine.cli import MOE_BACKEND_CHOICES
from moefleet.engine.server import event_loop
from moefleet.engine.server.drain import ABORT_FLUSH_S, DEFAULT_DRAIN_TIMEOUT_S, Drain
from moefleet.engine.server.request_guard import DEFAULT_MAX_REQUEST_BYTES
from moefleet.engine.topology import Topology, env_int, set_current

DEFAULT_PORT = 8000

# Routes of other parts served by `moefleet serve`: modules exposing `make_router(client) -> APIRouter`
# (e.g. an EPLB admin endpoint). Append the module name here to register one.
ROUTER_MODULES: list[str] = ["moefleet.engine.server.progress"]  # GET /health/progress


def _env_int(name: str, default: int) -> int:
    from moefleet.engine.cli import CommandError

    try:
        return env_int(os.environ, name, default)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve an HF-format MoE checkpoint over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="directory of an HF-format checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--role",
        choices=("mixed", "prefill", "decode"),
        default=os.environ.get("MOEFLEET_ROLE") or "mixed",
        help="mixed (default; env MOEFLEET_ROLE): whole requests; prefill / decode: one side of a "
        "disaggregated deployment behind `moefleet gateway` (docs/distributed.md)",
    )
    parser.add_argument(
        "--kv-transfer",
        choices=("auto", "tcp", "p2p"),
        default=os.environ.get("MOEFLEET_KV_TRANSFER") or "auto",
        help="prefill/decode KV transfer backend (env MOEFLEET_KV_TRANSFER): tcp = host-staged over TCP (any "
        "network); p2p = device to device over a torch.distributed pair group (NCCL on GPUs, gloo on CPU); "
        "auto = p2p when the KV cache is on a GPU, else tcp (default auto). A decode engine receives both "
        "either way; use tcp where the groups' NCCL cannot reach each other",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on cpu, bfloat16 on cuda",
    )
    parser.add_argument(
        "--quantization",
        choices=("auto", "none", "fp8"),
        help="weights: auto (default) = what the checkpoint has (block-FP8 stays FP8), none = dequantize "
        "to --dtype, fp8 = quantize linears and experts to 128x128 block FP8 at load",
    )
    parser.add_argument("--served-model-name", help="model name clients send (default: basename of --model)")
    parser.add_argument("--max-num-seqs", type=int, help="most sequences in one step")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="token budget of one step (chunked prefill)"
    )
    parser.add_argument("--max-model-len", type=int, help="context length: prompt + output tokens")
    parser.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: sized from memory)")
    parser.add_argument(
        "--block-size",
        type=int,
        help="KV cache page size in tokens (default: 64 for MLA models such as DeepSeek-V3 on CUDA, else 16)",
    )
    parser.add_argument("--seed", type=int, help="engine seed for requests without their own seed")
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "triton"),
        help="auto = triton on CUDA (paged kernels), torch (padded reference) on CPU (default auto)",
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=("auto", "on", "off"),
        help="auto = capture decode steps in CUDA graphs on CUDA with the triton backend (default auto); "
        "on = also in expert-parallel groups with a sync-free MoE backend (symm, deepep) before that is "
        "verified on GPUs",
    )
    parser.add_argument(
        "--tbo",
        choices=("auto", "on", "off"),
        help="two-batch overlap: each step as two micro-batches whose compute and MoE communication "
        "interleave; auto = off until a GPU-measured token threshold exists (default auto, see docs/distributed.md)",
    )
    group = parser.add_argument_group("multi-process (one process per GPU; DP attention + EP MoE)")
    group.add_argument(
        "--nnodes", type=int, default=None, help="nodes in the group (env MOEFLEET_NNODES, default 1)"
    )
    group.add_argument(
        "--node-rank", type=int, default=None, help="this node's rank (env MOEFLEET_NODE_RANK, default 0)"
    )
    group.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes (GPUs) per node (env MOEFLEET_NPROC_PER_NODE, default 1)",
    )
    group.add_argument(
        "--master-addr", default=None, help="address of node 0 (env MOEFLEET_MASTER_ADDR, default 127.0.0.1)"
    )
    group.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port (env MOEFLEET_MASTER_PORT, default 29500)",
    )
    group.add_argument(
        "--moe-backend",
        default="auto",
        choices=MOE_BACKEND_CHOICES,
        help="expert-parallel dispatch: auto = DeepEP when installed and its start-up self-check passes, else "
        "symm (torch symmetric memory) on CUDA, else all-to-all; nvlink = rows written into peers' memory "
        "(one node, low latency); only GPU-verified backends are auto-picked (default auto)",
    )
    eplb = parser.add_argument_group("expert-parallel load balancing (EPLB; docs/distributed.md)")
    eplb.add_argument(
        "--num-redundant-experts",
        type=int,
        default=None,
        metavar="N",
        help="extra physical expert slots holding copies of busy experts; (experts + N) must divide by the "
        "number of ranks (env MOEFLEET_EPLB_REDUNDANT_EXPERTS, default 0)",
    )
    eplb.add_argument(
        "--eplb",
        action="store_true",
        default=None,
        help="record expert load and allow rebalancing (on by itself with redundant experts or an interval; "
        "env MOEFLEET_EPLB_ENABLED)",
    )
    eplb.add_argument(
        "--eplb-window-steps",
        type=int,
        default=1000,
        metavar="W",
        help="expert load is summed over the last W engine steps (default 1000)",
    )
    eplb.add_argument(
        "--eplb-interval-steps",
        type=int,
        default=0,
        metavar="K",
        help="rebalance automatically every K engine steps (default 0: only on POST /admin/eplb/rebalance)",
    )
    eplb.add_argument(
        "--admin-token-file",
        metavar="F",
        help="file holding the bearer token of the /admin routes (or env MOEFLEET_ADMIN_TOKEN); without one "
        "every admin request is refused",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT: refuse new requests, let requests in flight finish for up to this long, then "
        f"abort them (finish_reason 'abort') and exit 0; a second signal forces (default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help=f"larger request bodies get 413 before they are read (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--print-examples",
        action="store_true",
        help="print curl and openai-client examples once the server listens",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    return parser


def launch_topology(args: argparse.Namespace) -> Topology:
    """This node's launch: flags first, then the launch contract's environment variables, then one process
    (`Topology.from_env`); this process is local rank 0 (it spawns the others)."""
    from moefleet.engine.cli import CommandError

    try:
        return Topology.from_env(
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            nproc_per_node=args.nproc_per_node,
            local_rank=0,
            master_addr=args.master_addr,
            master_port=args.master_port,
            num_redundant_experts=eplb_config(args).num_redundant_experts,
        )
    except ValueError as exc:
        raise CommandError(str(exc), "see `moefleet serve --help` (multi-process options)") from None


def check_args(args: argparse.Namespace) -> Topology:
    """Fast checks that need neither torch nor the model weights."""
    from moefleet.engine.cli import CommandError

    launch = launch_topology(args)
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port} is not a TCP port", "use a port in 1..65535")
    if not os.path.isdir(args.model):
        raise CommandError(
            f"--model {args.model}: no such directory",
            f"create a tiny demo model with `moefleet make-tiny-model --arch qwen3_moe --out {args.model}`",
        )
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CommandError(
            f"--model {args.model} has no config.json", "pass a directory holding an HF-format checkpoint"
        )
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        raise CommandError(f"--device {args.device} is not supported", "use --device cpu or --device cuda")
    if args.drain_timeout < 0:
        raise CommandError(f"--drain-timeout {args.drain_timeout:g} must be >= 0 seconds")
    if getattr(args, "kv_transfer", "auto") not in ("auto", "tcp", "p2p"):  # from MOEFLEET_KV_TRANSFER
        raise CommandError(f"--kv-transfer {args.kv_transfer!r} is not a backend", "use auto, tcp or p2p")
    if os.environ.get("MOEFLEET_KV_P2P_MAX_PAIRS"):  # read by the p2p sender / receiver when they start
        from moefleet.engine.disaggregation.p2p import max_pairs_setting

        try:
            max_pairs_setting()
        except ValueError as exc:
            raise CommandError(str(exc), "unset it for the default, or set a whole number >= 1") from exc
    for flag in (
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "num_kv_blocks",
        "max_request_bytes",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} {value} must be a positive integer")
    check_expert_slots(args, launch)
    from moefleet.engine.server.admin import admin_token

    try:
        admin_token(getattr(args, "admin_token_file", None))
    except ValueError as exc:
        raise CommandError(str(exc), "write the admin bearer token into that file") from None
    warn_unsupported_settings(os.environ)
    return launch


def eplb_config(args: argparse.Namespace) -> Any:
    """The EPLBConfig the flags (then MOEFLEET_EPLB_* variables) describe; a bad value is a CommandError."""
    from moefleet.engine.cli import CommandError
    from moefleet.engine.eplb.config import EPLBConfig

    redundant = getattr(args, "num_redundant_experts", None)
    if redundant is None:
        redundant = _env_int("MOEFLEET_EPLB_REDUNDANT_EXPERTS", 0)
    enabled = getattr(args, "eplb", None)
    if enabled is None:
        enabled = os.environ.get("MOEFLEET_EPLB_ENABLED", "").lower() in ("1", "true", "yes")
    try:
        return EPLBConfig(
            num_redundant_experts=redundant,
            enabled=bool(enabled),
            window_steps=getattr(args, "eplb_window_steps", 1000),
            interval_steps=getattr(args, "eplb_interval_steps", 0),
        )
    except ValueError as exc:
        raise CommandError(str(exc), "see `moefleet serve --help` (EPLB options)") from None


def check_expert_slots(args: argparse.Namespace, launch: Topology) -> None:
    """Routed experts + redundant slots must split evenly over the ranks (reads only config.json)."""
    import json

    from moefleet.engine.cli import CommandError
    from moefleet.engine.eplb.expert_location import check_model_expert_slots

    config = eplb_config(args)
    try:
        with open(os.path.join(args.model, "config.json")) as f:
            hf_config = json.load(f)
        check_model_expert_slots(hf_config, launch.world_size, config.num_redundant_experts)
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"--model {args.model}: cannot read config.json: {exc}") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None


# Settings the operator passes that this engine does not act on yet. Say so instead of dropping them silently.
UNSUPPORTED_ENV: dict[str, str] = {}


def unsupported_settings(env: Any) -> list[str]:
    """Warnings for operator-provided settings the engine cannot honour yet (pure)."""
    warnings = []
    for name, why in UNSUPPORTED_ENV.items():
        raw = env.get(name, "")
        if raw not in ("", "0"):
            warnings.append(f"{name}={raw}: {why}")
    return warnings


def warn_unsupported_settings(env: Any) -> None:
    for warning in unsupported_settings(env):
        print(f"moefleet serve: warning: {warning}", file=sys.stderr, flush=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a busy port is reported before the model loads."""
    from moefleet.engine.cli import CommandError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(
                f"port {port} on {host} is already in use",
                "pick another with --port or stop the process using it",
            ) from None
        raise CommandError(
            f"cannot listen on {host}:{port}: {exc.strerror}", "check --host and --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def examples(host: str, port: int, model: str) -> str:
    """Copy-paste examples for a server listening on host:port."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    base = f"http://{shown_host}:{port}"
    return f"""moefleet is serving '{model}' at {base}

  curl {base}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}}'

  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
reply = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
print(reply.choices[0].message.content)
EOF

  metrics: curl {base}/metrics    health: curl {base}/health
"""


def _check_device(device: str) -> None:
    from moefleet.engine.cli import CommandError

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda was requested but no CUDA GPU is available", "use --device cpu")


def engine_config(args: argparse.Namespace) -> Any:
    """The EngineConfig the flags describe (validated: a bad value is a CommandError)."""
    from moefleet.engine.cli import CommandError
    from moefleet.engine.config import EngineConfig

    options = {
        name: getattr(args, name)
        for name in (
            "dtype",
            "quantization",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "num_kv_blocks",
            "block_size",
            "seed",
            "attention_backend",
            "cuda_graphs",
            "tbo",
        )
        if getattr(args, name) is not None
    }
    try:
        return EngineConfig(model=args.model, device=args.device, **options)
    except ValueError as exc:
        raise CommandError(str(exc), "see `moefleet serve --help`") from None


def build_engine_client(args: argparse.Namespace) -> Any:
    from moefleet.engine.cli import CommandError
    from moefleet.engine.llm_engine import LLMEngine
    from moefleet.engine.server.async_engine import LocalEngineClient

    config = engine_config(args)
    # One process holds every slot; redundant experts are honoured (loaded as replicas) like in a group.
    redundant = eplb_config(args).num_redundant_experts
    set_current(Topology(num_redundant_experts=redundant))
    try:
        engine = LLMEngine(config)
    except ValueError as exc:  # unsupported architecture, missing tokenizer, bad checkpoint: say so plainly
        raise CommandError(f"cannot load the model in {args.model}: {exc}", "see docs/serving.md") from None
    role = getattr(args, "role", "mixed")
    if role != "mixed":
        from moefleet.engine.disaggregation.roles import PDEngineClient

        client = PDEngineClient(
            engine, role, kv_host=args.host, kv_transfer=getattr(args, "kv_transfer", "auto")
        )
        print(
            f"moefleet serve: role {role}, KV transfer backend {client.sender.name} at {client.receiver.address}",
            file=sys.stderr,
            flush=True,
        )
        return client
    return LocalEngineClient(engine)


def served_model_name(args: argparse.Namespace) -> str:
    return str(args.served_model_name or os.path.basename(os.path.normpath(args.model)))


async def _serve(
    server: Any, sock: socket.socket, on_started: Any, stop: threading.Event | None, drain: Drain, client: Any
) -> None:
    """Serve until `stop` is set (a worker node's group ended) or the drain says stop (see drain.py)."""
    from moefleet.engine.server.drain import ABORT, STOP, abort_in_flight

    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        on_started()
    aborted_at: float | None = None
    while not task.done():
        if stop is not None:  # a node that is not the front end: it stops when its group loop ends
            if stop.is_set():
                server.should_exit = True
        else:
            action = drain.action()
            if action == ABORT and aborted_at is None:
                aborted = abort_in_flight(client)
                print(
                    f"moefleet serve: aborted {aborted} request(s) still in flight",
                    file=sys.stderr,
                    flush=True,
                )
                aborted_at = asyncio.get_running_loop().time()
            flushed = (
                aborted_at is not None and asyncio.get_running_loop().time() - aborted_at > ABORT_FLUSH_S
            )
            if action == STOP or flushed:
                server.should_exit = True
                server.force_exit = drain.forced or flushed  # do not wait on connections that hang on
        await asyncio.sleep(0.05)
    await task


def make_server(config: Any, drain: Drain) -> Any:
    """A uvicorn server whose SIGTERM/SIGINT drains (first signal) or forces (second) instead of stopping."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not recorded in _captured_signals: uvicorn would re-raise it after serving and die by the signal
            # (exit 143) instead of returning 0 after an orderly drain.
            drain.on_signal()

    return DrainingServer(config)


def serve_http(
    client: Any,
    sock: socket.socket,
    args: argparse.Namespace,
    stop: threading.Event | None = None,
    drain: Drain | None = None,
) -> None:
    """Serve the app over `client` on the bound socket until a drain ends (SIGTERM / Ctrl-C) or `stop`."""
    import uvicorn
    from moefleet.engine.server.api import build_app
    from moefleet.engine.server.request_guard import RequestGuard

    name = served_model_name(args)
    port = sock.getsockname()[1]
    from moefleet.engine.server.admin import admin_token, make_admin_router

    routers = [importlib.import_module(module).make_router(client) for module in ROUTER_MODULES]
    routers.append(make_admin_router(admin_token(getattr(args, "admin_token_file", None))))
    from moefleet.engine.disaggregation import roles

    routers.append(roles.make_router(client))
    drain = drain if drain is not None else Drain(args.drain_timeout)
    app = RequestGuard(build_app(client, name, routers), drain, max_request_bytes=args.max_request_bytes)
    if getattr(client, "role", "mixed") != "mixed":  # a prefill/decode server: read the transfer headers
        app = roles.pd_headers(app)
    # host/port only label uvicorn's log lines; it serves on the socket bound before the model loaded.
    config = uvicorn.Config(
        app, host=args.host, port=port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    server = make_server(config, drain)

    def on_started() -> None:
        if args.print_examples:
            print(examples(args.host, port, name), flush=True)

    try:
        event_loop.run(_serve(server, sock, on_started, stop, drain, client), config)
    except KeyboardInterrupt:  # a Ctrl-C outside uvicorn's handlers (e.g. during start-up): a clean exit
        pass


def print_weight_plan(args: argparse.Namespace, world_size: int) -> None:
    """Weights per GPU this deployment will hold (memory_plan), before anything loads."""
    from moefleet.engine.fp8_weights import resolve_quantization
    from moefleet.engine.memory_plan import startup_line

    config = engine_config(args)
    try:
        quantization = resolve_quantization(config.hf_config, config.quantization)
        dtype_bytes = 4 if config.dtype == "float32" else 2
        line = startup_line(config.hf_config, world_size, quantization, dtype_bytes)
    except (KeyError, TypeError, ValueError):  # a config this plan does not know: the load will say why
        return
    print(f"moefleet serve: {line}", flush=True)
