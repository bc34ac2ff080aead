"""Latency the gateway adds: streaming requests at a fixed rate, direct to a backend vs through `moefleet gateway`.

The backend is a minimal ASGI app that streams a few SSE chunks at once (so its own time is ~0), in its own
process; the gateway runs as the real `moefleet gateway` process; the load generator is a small Go program
(benchmarks/loadgen, standard library only, built here with `go build` and cached), one process per point, so
that on a small machine the generator is not what saturates (an asyncio Python generator saturated 2 cores
before 500 req/s, even for direct requests). Direct and through-gateway points run in one run, one after the
other per rate, with the same generator; the table prints p50/p99 of time to first byte and to the end of the
stream, the gateway process's CPU time per request (user + system, from /proc: the figure that scales), and
the added latency. `--compare DIR` adds a second gateway from another tree (before/after in one run).

    .venv/bin/python benchmarks/gateway_overhead.py [--rates 100 500] [--seconds 5] [--chunks 8] [--pin]

About a minute with the defaults (start-up of the processes, 20 s of load, warm-up), never more than 3.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHUNK = b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'


def backend_app(chunks: int):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/metrics":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["method"] == "POST":
            while (await receive()).get("more_body"):
                pass
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"status":"ok"}'})

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


LOADGEN_DIR = Path(__file__).with_name("loadgen")


def build_loadgen() -> str:
    """Compile the Go load generator (standard library only) once; a cached binary is reused.
    `MOEFLEET_LOADGEN` names a prebuilt binary instead (a machine without Go, e.g. a lent GPU host)."""
    prebuilt = os.environ.get("MOEFLEET_LOADGEN")
    if prebuilt:
        return prebuilt
    binary = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moefleet" / "gateway-loadgen"
    source = LOADGEN_DIR / "main.go"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=LOADGEN_DIR, check=True)
    return str(binary)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(loadgen: list[str], url: str, rate: float, seconds: float) -> tuple[list, list, list]:
    command = [*loadgen, "-url", url + "/v1/completions", "-rate", str(rate), "-seconds", str(seconds)]
    # Bounded: a point that cannot finish within its duration + 60 s is a failure, not a wait.
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=seconds + 90)
    out = json.loads(done.stdout)
    return out["ttfb"], out["total"], out["errors"]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else float("nan")


def start_gateway(pin: list[str], backend_port: int, port: int, pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if pythonpath:  # another checkout's `moefleet` package (see --compare)
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    moefleet = [sys.executable, "-c", "import sys; from moefleet.engine.cli import main; sys.exit(main())"]
    args = ["gateway", "--backend", f"http://127.0.0.1:{backend_port}", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--log-level", "warning"]
    return subprocess.Popen([*pin, *moefleet, *args], stdout=subprocess.DEVNULL, env=env)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 500])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="taskset: the gateway(s) on CPU 0, the backend and the load generator on the others",
    )
    parser.add_argument(
        "--compare",
        metavar="DIR",
        help="also measure the gateway of another tree: DIR holds its `moefleet` package (e.g. from "
        "`git archive REV engine src`, with src/moefleet as DIR/moefleet and engine as DIR/moefleet/engine)",
    )
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        import uvicorn

        uvicorn.run(backend_app(args.chunks), host="127.0.0.1", port=args.serve_backend, log_level="error")
        return 0
    cpus = os.cpu_count() or 1
    pin_gateway = ["taskset", "-c", "0"] if args.pin and cpus > 1 else []
    pin_rest = ["taskset", "-c", f"1-{cpus - 1}"] if args.pin and cpus > 1 else []
    loadgen = [*pin_rest, build_loadgen()]
    backend_port = free_port()
    backend = subprocess.Popen(
        [
            *pin_rest,
            sys.executable,
            __file__,
            "--serve-backend",
            str(backend_port),
            "--chunks",
            str(args.chunks),
        ]
    )
    variants = [("gateway", None)] + ([("gateway (compared tree)", args.compare)] if args.compare else [])
    gateways = {}
    processes = [backend]
    for name, tree in variants:
        port = free_port()
        process = start_gateway(pin_gateway, backend_port, port, tree)
        processes.append(process)
        gateways[name] = (f"http://127.0.0.1:{port}", process)
    try:
        direct = f"http://127.0.0.1:{backend_port}"
        wait_ready(direct)
        for url, _ in gateways.values():
            wait_ready(url)
        print(
            f"# {cpus} CPUs{' (gateways pinned to CPU 0)' if pin_gateway else ''}, load average "
            f"{os.getloadavg()[0]:.1f} at the start; streaming requests of {args.chunks} chunks; "
            f"{args.seconds:g} s per point; Go open-loop load generator"
        )
        print(
            "| rate (req/s) | target | requests | errors | TTFB p50 (ms) | TTFB p99 (ms) | total p50 (ms) "
            "| total p99 (ms) | gateway CPU per request (ms) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for rate in args.rates:
            rows = {}
            targets = [("direct", direct, None)] + [(n, u, p) for n, (u, p) in gateways.items()]
            for name, url, process in targets:
                before = cpu_seconds(process.pid) if process else 0.0
                ttfb, total, errors = load(loadgen, url, rate, args.seconds)
                cpu = ""
                if process:
                    per_request = (cpu_seconds(process.pid) - before) / max(1, len(ttfb) + len(errors))
                    cpu = f"{per_request * 1000:.2f}"
                rows[name] = (pct(ttfb, 50), pct(ttfb, 99), pct(total, 50), pct(total, 99))
                print(
                    f"| {rate:g} | {name} | {len(ttfb)} | {len(errors)} | "
                    + " | ".join(f"{v:.2f}" for v in rows[name])
                    + f" | {cpu} |",
                    flush=True,
                )
                if errors:
                    print(f"# {name} errors (first 3): {errors[:3]}", flush=True)
            for name in gateways:
                added = [g - d for g, d in zip(rows[name], rows["direct"], strict=True)]
                print(
                    f"| {rate:g} | **added by {name}** | | | "
                    + " | ".join(f"{v:+.2f}" for v in added)
                    + " | |",
                    flush=True,
                )
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
