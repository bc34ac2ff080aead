"""`moefleet local -f manifest.yaml`: a MoEDeployment's roles, groups and gateway as processes on this machine.

The same pieces the operator deploys, scaled to one host: each group is one `moefleet serve` (one process per
rank, `--nproc-per-node`), launched with the operator's environment contract (MOEFLEET_ROLE, MOEFLEET_EPLB_*,
...), and one `moefleet gateway` reads a config built with the schema the operator renders
(moefleet.gateway_schema). `plan_fleet` decides everything (pure, unit-tested); `run_fleet` starts, watches and
stops the processes.

Scaling to the machine: a role keeps at most `max_replicas` of its groups, and each group runs
min(its ranks, `ranks_per_group`) ranks. On CUDA every rank gets its own GPU (CUDA_VISIBLE_DEVICES per group).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moefleet.gateway_schema import GatewayConfig, GroupEndpoint, RoleEndpoints

MOEFLEET = [sys.executable, "-c", "import sys; from moefleet.engine.cli import main; sys.exit(main())"]
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LocalGroup:
    name: str
    role: str
    port: int
    argv: tuple[str, ...]  # after `moefleet`
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class FleetPlan:
    groups: tuple[LocalGroup, ...]
    gateway: GatewayConfig
    gateway_port: int


def plan_fleet(
    body: dict[str, Any],
    *,
    model: str | None,
    device: str,
    dtype: str | None,
    gateway_port: int,
    first_port: int,
    ranks_per_group: int,
    max_replicas: int,
    num_gpus: int = 0,
) -> FleetPlan:
    """The processes that run the MoEDeployment `body` (a parsed manifest) here. Raises ValueError naming
    what to change."""
    from moefleet.operator.spec import SpecError, parse

    body = {**body, "metadata": {"namespace": "local", **(body.get("metadata") or {})}}
    try:
        spec = parse(body, default_image="local")
    except SpecError as exc:
        raise ValueError(f"the manifest is not a valid MoEDeployment: {exc}") from exc
    model_path = model or spec.model.path
    if not Path(model_path).is_dir():
        raise ValueError(
            f"model directory {model_path!r} does not exist here; pass --model DIR (for a try-out: "
            "moefleet make-tiny-model --arch qwen3_moe --out /tmp/tiny)"
        )
    if ranks_per_group < 1 or max_replicas < 1:
        raise ValueError("--ranks-per-group and --max-replicas must be at least 1")
    groups: list[LocalGroup] = []
    port = first_port
    next_gpu = 0
    for role in spec.roles:
        for replica in range(min(role.replicas, max_replicas)):
            ranks = min(role.ranks_per_group, ranks_per_group)
            name = f"{spec.name}-{role.name}-{replica}"
            env = {
                "MOEFLEET_DEPLOYMENT": spec.name,
                "MOEFLEET_ROLE": role.name,
                "MOEFLEET_GROUP": name,
                "MOEFLEET_EPLB_ENABLED": "true" if spec.eplb.enabled else "false",
                "MOEFLEET_EPLB_REDUNDANT_EXPERTS": str(spec.eplb.redundant_experts),
            }
            if device == "cuda":
                if next_gpu + ranks > num_gpus:
                    raise ValueError(
                        f"group {name} needs GPUs {next_gpu}..{next_gpu + ranks - 1} but this machine has "
                        f"{num_gpus}; lower --ranks-per-group or --max-replicas"
                    )
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(next_gpu, next_gpu + ranks))
                next_gpu += ranks
            # The device default dtype goes before the manifest's engine args (which may set their own); an
            # explicit --dtype goes after them, so it wins (argparse keeps the last occurrence).
            argv = (
                "serve",
                "--model", model_path,
                "--served-model-name", spec.model.served_name,
                "--host", "127.0.0.1",
                "--port", str(port),
                "--device", device,
                "--dtype", "float32" if device == "cpu" else "bfloat16",
                "--nproc-per-node", str(ranks),
                "--master-port", str(port + 1),
                *spec.engine_args,
                *role.engine_args,
                *(("--dtype", dtype) if dtype else ()),
            )  # fmt: skip
            groups.append(LocalGroup(name=name, role=role.name, port=port, argv=argv, env=env))
            port += 2  # HTTP port and the group's rendezvous port
    roles = {
        role: RoleEndpoints(
            groups=tuple(
                GroupEndpoint(name=g.name, url=g.url, ranks=_ranks(g)) for g in groups if g.role == role
            )
        )
        for role in dict.fromkeys(g.role for g in groups)
    }
    gateway = GatewayConfig(
        model=spec.model.served_name,
        mode="disaggregated" if spec.disaggregated else "mixed",
        routing_policy=spec.gateway.routing_policy,
        port=gateway_port,
        roles=roles,
        source=f"moefleet local ({spec.name})",
    )
    return FleetPlan(groups=tuple(groups), gateway=gateway, gateway_port=gateway_port)


def _ranks(group: LocalGroup) -> int:
    return int(group.argv[group.argv.index("--nproc-per-node") + 1])


def load_manifest(path: str) -> dict[str, Any]:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "MoEDeployment"]
    if len(found) != 1:
        raise ValueError(f"{path} must hold exactly one MoEDeployment, found {len(found)}")
    return found[0]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_fleet(plan: FleetPlan, log_dir: Path, print_examples: bool = True) -> int:
    """Start every group, then the gateway; wait until they are healthy; run until Ctrl-C / SIGTERM or until a
    process dies; stop everything (gateway first, then groups, each with SIGTERM so it drains)."""
    processes: list[tuple[str, subprocess.Popen]] = []
    stopping = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["flag"] = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    config_file = log_dir / "gateway.json"
    config_file.write_text(plan.gateway.to_json())
    try:
        for group in plan.groups:
            log = open(log_dir / f"{group.name}.log", "w")  # noqa: SIM115 - lives as long as the process
            env = {**os.environ, **group.env}
            processes.append(
                (group.name, subprocess.Popen([*MOEFLEET, *group.argv], env=env, stdout=log, stderr=log))
            )
            print(
                f"moefleet local: group {group.name} ({group.role}) -> {group.url}, log {log.name}",
                flush=True,
            )
        gateway_log = open(log_dir / "gateway.log", "w")  # noqa: SIM115
        gateway_argv = [*MOEFLEET, "gateway", "--config", str(config_file), "--host", "127.0.0.1",
                        "--port", str(plan.gateway_port)]  # fmt: skip
        processes.append(("gateway", subprocess.Popen(gateway_argv, stdout=gateway_log, stderr=gateway_log)))
        gateway_url = f"http://127.0.0.1:{plan.gateway_port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = [g.url for g in plan.groups] + [gateway_url]
        while pending and not stopping["flag"]:
            dead = [(name, p.returncode) for name, p in processes if p.poll() is not None]
            if dead:
                print(f"moefleet local: {dead[0][0]} exited with code {dead[0][1]} while starting; see "
                      f"{log_dir}/{dead[0][0]}.log", file=sys.stderr, flush=True)  # fmt: skip
                return 1
            if time.monotonic() > deadline:
                print(
                    f"moefleet local: not healthy after {START_TIMEOUT_S:.0f} s: {pending}", file=sys.stderr
                )
                return 1
            pending = [url for url in pending if not _healthy(url)]
            time.sleep(0.5)
        if stopping["flag"]:
            return 0
        print(
            f"moefleet local: serving '{plan.gateway.model}' through the gateway at {gateway_url}", flush=True
        )
        if print_examples:
            print(fleet_examples(gateway_url, plan.gateway.model or "model", plan.gateway.mode), flush=True)
        while not stopping["flag"]:
            dead = [(name, p.returncode) for name, p in processes if p.poll() is not None]
            if dead:
                print(f"moefleet local: {dead[0][0]} exited with code {dead[0][1]}; stopping the fleet "
                      f"(logs in {log_dir})", file=sys.stderr, flush=True)  # fmt: skip
                return 1
            time.sleep(0.5)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_all(processes)


def fleet_examples(url: str, model: str, mode: str) -> str:
    """Copy-paste requests for the fleet's gateway (printed once it is healthy)."""
    completion = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 32})
    chat = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 32,
            "stream": True,
        }
    )
    how = (
        "each request is computed by the prefill group, its KV cache moved to the decode group, which streams"
        if mode == "disaggregated"
        else "requests go to the least-loaded group"
    )
    return f"""  ({how})
  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{completion}'
  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'
  python -c "from openai import OpenAI; print(OpenAI(base_url='{url}/v1', api_key='-').completions.create(model='{model}', prompt='Hi', max_tokens=16).choices[0].text)"
  metrics: curl {url}/metrics    Ctrl-C stops the fleet (gateway first, then each group drains)"""


def _stop_all(processes: list[tuple[str, subprocess.Popen]]) -> None:
    for _, process in reversed(processes):  # gateway first: no new requests reach draining groups
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for _, process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        if process.poll() is None:
            process.kill()
            process.wait()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "local",
        help="run a MoEDeployment manifest's groups and gateway as local processes",
        description="Run the groups and the gateway of a MoEDeployment on this machine (no cluster needed).",
    )
    parser.add_argument("-f", "--file", required=True, help="MoEDeployment manifest (YAML)")
    parser.add_argument("--model", help="checkpoint directory (default: the manifest's spec.model.path)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="overrides the manifest's; default: float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port")
    parser.add_argument("--first-engine-port", type=int, default=18000, help="groups use ports from here")
    parser.add_argument(
        "--ranks-per-group", type=int, default=None, help="default: 2 on CPU, 1 GPU each on CUDA"
    )
    parser.add_argument("--max-replicas", type=int, default=1, help="groups kept per role")
    parser.add_argument("--log-dir", default=None, help="process logs (default: a new temporary directory)")
    return parser


def run(args: argparse.Namespace) -> int:
    from moefleet.engine.cli import CommandError

    num_gpus = 0
    if args.device == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()
    try:
        plan = plan_fleet(
            load_manifest(args.file),
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            gateway_port=args.port,
            first_port=args.first_engine_port,
            ranks_per_group=args.ranks_per_group or (2 if args.device == "cpu" else 1),
            max_replicas=args.max_replicas,
            num_gpus=num_gpus,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="moefleet-local-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return run_fleet(plan, log_dir)
