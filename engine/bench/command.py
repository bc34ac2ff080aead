"""`moefleet bench`: offline decode/prefill throughput of a preset on random weights, one process per GPU.

Example (4 GPUs, DeepSeek-V3 width, 4 MoE layers, decode of 64 sequences per GPU at 2048 cached tokens):
    moefleet bench --preset deepseek-v3 --layers 4 --nproc-per-node 4 --mode decode --batch-size 64 --kv-len 2048

Deployment shape on one GPU (emulate.py, projection.py): one GPU of a decode EP72 deployment (288 physical
experts -> 4 per GPU, 256 sequences at 2,000 cached tokens), measured at 2 and 4 layers, projected to 61:
    moefleet bench --preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 \
        --num-redundant-experts 32 --project-layers 61 --project-depths 2,4
The same shape on 2 real GPUs (4 experts each, real dispatch/combine between them, e.g. to time --tbo on/off):
    moefleet bench --preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 \
        --num-redundant-experts 32 --nproc-per-node 2 --moe-backend symm --tbo on
"""

from __future__ import annotations

import argparse
import json
import socket
from dataclasses import asdict
from typing import Any

from moefleet.engine.cli import MOE_BACKEND_CHOICES, CommandError
from moefleet.engine.gemm_backend import GEMM_BACKENDS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from moefleet.engine.bench.presets import PRESETS
    from moefleet.engine.bench.runner import BenchOptions

    defaults = BenchOptions()
    p = subparsers.add_parser("bench", help="offline throughput on random weights for named model presets")
    p.add_argument(
        "--preset", action="append", choices=sorted(PRESETS), help="repeatable; default deepseek-v3"
    )
    p.add_argument("--layers", type=int, default=defaults.num_layers, help="decoder layers (full width)")
    p.add_argument("--dense-layers", type=int, default=defaults.dense_layers, help="leading dense layers")
    p.add_argument("--mode", action="append", choices=["decode", "prefill"], help="repeatable; default both")
    p.add_argument("--batch-size", type=int, action="append", help="decode sequences per GPU (repeatable)")
    p.add_argument("--kv-len", type=int, default=defaults.kv_len, help="decode: cached tokens per sequence")
    p.add_argument(
        "--prefill-tokens", type=int, default=defaults.prefill_tokens, help="prefill tokens per GPU"
    )
    p.add_argument("--prefill-seq-len", type=int, default=defaults.prefill_seq_len)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--device", choices=["cuda", "cpu"], default=defaults.device)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=defaults.dtype)
    p.add_argument(
        "--quantization",
        choices=["none", "fp8"],
        default="none",
        help="fp8: random weights quantised to 128x128 block FP8",
    )
    p.add_argument(
        "--gemm-backend", default="auto", choices=list(GEMM_BACKENDS),
        help="auto = torch's cuBLAS/CUTLASS GEMMs where verified (blockwise FP8 scaled_mm for FP8 linears and "
        "prefill experts, bf16 grouped_mm for experts) and the split-K Triton GEMM for decode-size FP8 linears "
        "where measured faster, else Triton; cublas = the library GEMMs without split-K; triton = the original "
        "Triton kernels only (side by side)",
    )  # fmt: skip
    p.add_argument("--moe-backend", default=defaults.backend, choices=list(MOE_BACKEND_CHOICES))
    p.add_argument(
        "--attention-backend", default=defaults.attention_backend, choices=["auto", "torch", "triton"],
        help="auto = triton on CUDA, torch on CPU",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", default=defaults.cuda_graphs, choices=["auto", "off"],
        help="auto = decode steps replay a CUDA graph (CUDA, triton backend; in an EP group too, incl. the TBO "
        "step) when capturable (a2a's host sync is not: it then runs eagerly, the reason printed)",
    )  # fmt: skip
    p.add_argument(
        "--tbo", default=defaults.tbo, choices=["auto", "on", "off"],
        help="two-batch overlap; auto = off until a measured token threshold exists (docs/distributed.md)",
    )  # fmt: skip
    p.add_argument(
        "--tbo-timeline", action="store_true",
        help="CUDA: profile 3 more steps (graph replays, or eager prefill steps) and print their kernels' timeline per stream and "
        "how much of the communication kernels' time other kernels ran under (JSON: graph_timeline); with TBO "
        "steps also time one eager step stage by stage on its stream: how much communication ran under the other "
        "micro-batch's compute, a per-stage table and a text timeline (JSON: tbo_timeline)",
    )  # fmt: skip
    p.add_argument(
        "--trace-out", default="", metavar="PATH",
        help="with --tbo-timeline: also write the profiled steps' Chrome trace there (gzip if PATH ends in .gz; "
        "open it in Perfetto)",
    )  # fmt: skip
    p.add_argument(
        "--profile-steps", type=int, default=0, metavar="N",
        help="CUDA: N more steps of the timed path under torch.profiler; rank 0 prints its kernels by GPU time per step",
    )  # fmt: skip
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="KV cache page size (tokens)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak for prefill MFU (default: by GPU name)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) in the EP group")
    p.add_argument("--no-breakdown", action="store_true", help="skip the instrumented per-part steps")
    p.add_argument(
        "--routing-skew",
        default="",
        metavar="zipf:S",
        help="synthetic Zipf(S) expert popularity at the router",
    )
    p.add_argument(
        "--num-redundant-experts", type=int, default=0, metavar="N", help="EPLB spare expert slots"
    )
    p.add_argument(
        "--eplb",
        action="store_true",
        help="rebalance after the timed steps and time again (before/after table)",
    )
    shape = p.add_argument_group("deployment shape on one or a few GPUs (docs/benchmarks.md)")
    shape.add_argument(
        "--emulate-ep",
        type=int,
        default=0,
        metavar="N",
        help="give each GPU the expert count ((experts + redundant) / N) and routed-row volume (tokens x top-k) "
        "of one GPU of an N-way EP deployment, at the real width; on one GPU no communication (see "
        "--comm-us-per-layer), with --nproc-per-node W (<= N) real dispatch/combine between the W GPUs",
    )
    shape.add_argument(
        "--project-layers",
        type=int,
        metavar="L",
        help="run each scenario at the --project-depths and project the step of an L-layer model "
        "(slope and intercept printed)",
    )
    shape.add_argument(
        "--project-depths",
        default="2,4",
        metavar="D1,D2",
        help="decoder depths measured for --project-layers (default 2,4; each > --dense-layers)",
    )
    p.add_argument(
        "--moe-metrics-every",
        type=int,
        default=0,
        metavar="N",
        help="install the serving path's sampled MoE dispatch/combine metrics (one forward in N, as "
        "MOEFLEET_MOE_METRICS_EVERY; in CUDA graphs too) and print what they recorded: their cost side by side "
        "with 0 (off, the default here)",
    )
    shape.add_argument(
        "--emulate-comm-us",
        type=float,
        default=0.0,
        metavar="US",
        help="with --emulate-ep on one GPU: each dispatch and each combine of the step's tokens also waits US "
        "microseconds on the GPU (a micro-batch of half the tokens half as long; one warp spinning on the GPU's "
        "nanosecond timer, wall-clock time, on the stream two-batch overlap uses for communication), standing for "
        "the deployment's transfers; measures how much of it --tbo on hides",
    )
    shape.add_argument(
        "--comm-us-per-layer",
        type=float,
        default=0.0,
        metavar="US",
        help="dispatch + combine microseconds per MoE layer added to the projection (e.g. measured on 2 GPUs)",
    )
    p.add_argument("--json", metavar="FILE", help="also write every row (and per-rank data) as JSON")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(local_rank: int, world_size: int, port: int, options: Any, queue: Any) -> None:
    from moefleet.engine.bench.runner import run_rank
    from moefleet.engine.distributed.groups import init_distributed, shutdown
    from moefleet.engine.topology import Topology

    try:
        launch = Topology(nproc_per_node=world_size, local_rank=local_rank, master_port=port)
        state = init_distributed(launch, device=options.device)
        try:
            queue.put(("ok", run_rank(options, state.device_group).to_dict()))
        finally:
            shutdown(state)
    except BaseException as exc:
        queue.put(("error", f"rank {local_rank}: {type(exc).__name__}: {exc}"))
        raise


def run_options(options: Any, nproc: int) -> list[dict[str, Any]]:
    """Run one scenario on `nproc` processes; returns each rank's result dict."""
    from moefleet.engine.bench.runner import run_rank

    if nproc == 1:
        return [run_rank(options).to_dict()]
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(i, nproc, port, options, queue)) for i in range(nproc)]
    for proc in procs:
        proc.start()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for _ in procs:
        status, payload = queue.get(timeout=3600)
        (results if status == "ok" else errors).append(payload)
        if errors:
            break
    for proc in procs:
        proc.join(timeout=5 if errors else 60)
        if proc.is_alive():
            proc.terminate()
    if errors:
        raise RuntimeError("; ".join(errors))
    return sorted(results, key=lambda r: r["rank"])


def emulated_shape_line(options: Any, nproc: int = 1) -> str:
    """Validate the emulated deployment on `nproc` real GPUs (experts divide over the deployment's GPUs,
    nproc <= N, top-k fits the real GPUs' slots) and describe each GPU's MoE work."""
    from moefleet.engine.bench.emulate import emulated_shape

    shape = emulated_shape(options, nproc)
    tokens = shape.tokens_per_gpu
    comm_us = getattr(options, "emulate_comm_us", 0.0)
    if comm_us and nproc > 1:
        raise ValueError(
            f"--emulate-comm-us stands for the transfers on one GPU; on {nproc} GPUs the real dispatch/combine "
            "runs: drop --emulate-comm-us or --nproc-per-node"
        )
    if nproc == 1:
        comm = (
            f"emulated communication: a {comm_us:g} us GPU wait per dispatch and per combine"
            if comm_us
            else "no communication"
        )
        return (
            f"emulating one GPU of EP{shape.ep_size}: {shape.physical_experts} physical experts -> "
            f"{shape.experts_per_gpu} per GPU; {tokens} tokens x top-{shape.top_k} = {shape.rows_per_gpu:,} routed "
            f"rows per MoE layer ({shape.rows_per_expert:,.0f} per expert), all to local experts; {comm}"
        )
    return (
        f"EP{shape.ep_size} emulated on {nproc} GPUs: {shape.experts_per_gpu} experts per GPU "
        f"({shape.physical_experts} physical / {shape.ep_size}), {tokens} x top-{shape.top_k} = "
        f"{shape.rows_per_gpu:,} rows per GPU per MoE layer ({shape.rows_per_expert:,.0f} per expert); "
        f"dispatch/combine between the {nproc} real GPUs (remote share {_percent(shape.remote_share)} vs "
        f"{_percent(shape.deployment_remote_share)} at EP{shape.ep_size})"
    )


def _percent(share: float) -> str:
    """50% / 98.6%: one decimal, none when it is 0."""
    return f"{100 * share:.1f}".removesuffix(".0") + "%"


def project_depths(args: argparse.Namespace) -> list[int]:
    """The depths each scenario runs at: --layers, or the two --project-depths with --project-layers."""
    if not args.project_layers:
        return [args.layers]
    try:
        depths = sorted({int(d) for d in args.project_depths.split(",")})
    except ValueError:
        raise CommandError(f"--project-depths {args.project_depths!r} must be integers like 2,4") from None
    if len(depths) < 2 or depths[0] <= args.dense_layers:
        raise CommandError(
            f"--project-depths {args.project_depths} must name two or more different depths, each larger than "
            f"--dense-layers ({args.dense_layers})",
            "e.g. --project-depths 2,4 (or --dense-layers 3 --project-depths 4,6 for DeepSeek's dense layers)",
        )
    if args.project_layers < depths[-1]:
        raise CommandError(f"--project-layers ({args.project_layers}) must be >= the largest measured depth")
    return depths


def run(args: argparse.Namespace) -> int:
    import torch
    from moefleet.engine.bench.report import (
        eplb_summary,
        format_eplb_table,
        format_projection_table,
        format_table,
        projection_row,
        summarize,
    )
    from moefleet.engine.bench.runner import BenchOptions

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(
                "--device cuda but no CUDA GPU is visible", "use --device cpu --preset tiny-deepseek"
            )
        if args.nproc_per_node > torch.cuda.device_count():
            raise CommandError(
                f"--nproc-per-node ({args.nproc_per_node}) exceeds the visible GPUs ({torch.cuda.device_count()})",
                "lower --nproc-per-node or set CUDA_VISIBLE_DEVICES",
            )
    depths = project_depths(args)
    rows, raw, projections = [], [], []
    for preset in args.preset or ["deepseek-v3"]:
        for mode in args.mode or ["decode", "prefill"]:
            batches = (args.batch_size or [BenchOptions().batch_size]) if mode == "decode" else [0]
            for batch, depth in ((b, d) for b in batches for d in depths):
                try:
                    options = BenchOptions(
                        preset=preset, num_layers=depth, dense_layers=args.dense_layers, mode=mode,
                        batch_size=batch or BenchOptions().batch_size, kv_len=args.kv_len,
                        prefill_tokens=args.prefill_tokens, prefill_seq_len=args.prefill_seq_len,
                        steps=args.steps, warmup=args.warmup, device=args.device, dtype=args.dtype, quantization=args.quantization, gemm_backend=args.gemm_backend,
                        backend=args.moe_backend, breakdown=not args.no_breakdown,
                        attention_backend=args.attention_backend, cuda_graphs=args.cuda_graphs,
                        block_size=args.block_size, peak_tflops=args.peak_tflops,
                        routing_skew=args.routing_skew, num_redundant_experts=args.num_redundant_experts,
                        eplb=args.eplb, tbo=args.tbo, emulate_ep=args.emulate_ep,
                        tbo_timeline=args.tbo_timeline, trace_out=args.trace_out, emulate_comm_us=args.emulate_comm_us,
                        profile_steps=args.profile_steps, moe_metrics_every=args.moe_metrics_every,
                    )  # fmt: skip
                    if args.emulate_ep:
                        print(
                            f"moefleet bench: {emulated_shape_line(options, args.nproc_per_node)}", flush=True
                        )
                except ValueError as exc:
                    raise CommandError(str(exc)) from None
                ranks = run_options(options, args.nproc_per_node)
                row = summarize(asdict(options), ranks)
                eplb = eplb_summary(ranks)
                if eplb is not None:
                    row["eplb"] = eplb
                rows.append(row)
                raw.append({"options": asdict(options), "summary": row, "ranks": ranks})
                print(format_table([row]).splitlines()[-1], flush=True)
                if args.project_layers and depth == depths[-1]:
                    projections.append(
                        projection_row(
                            rows[-len(depths) :],
                            args.project_layers,
                            args.dense_layers,
                            args.comm_us_per_layer,
                        )
                    )
    print()
    print(format_table(rows))
    if projections:
        print()
        print(f"Projected to {args.project_layers} layers (step = intercept + slope x layers + comm):")
        print(format_projection_table(projections))
    if any("eplb" in row for row in rows):
        print()
        print(format_eplb_table([row for row in rows if "eplb" in row]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": raw, "projections": projections} if projections else raw, f, indent=2)
    return 0
