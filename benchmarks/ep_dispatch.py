"""Dispatch + combine time per MoE layer, backends side by side (one table), on the GPUs of one host:

    python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py [--tokens 256] [--hidden 7168]
        [--top-k 8] [--experts 256] [--backends a2a,symm,symm-graph,nvlink,nvlink-graph,deepep-normal,deepep-ll,...]
        [--expert-weights fp8|bf16|none] [--intermediate 2048]

Each rank routes `tokens` bf16 rows of width `hidden` to top-k of `experts` (uniform random, the same routing
for every backend). Two timings per backend:
- "identity": the experts are the identity, so the time is dispatch_start -> dispatch_finish -> combine_start ->
  combine_finish of one layer (the dispatcher's own reorders included). Rows that arrive as FP8 (deepep-ll)
  are dequantised for the identity on their valid rows only (`DispatchedTokens.real_rows`, a masked Triton
  kernel): what an identity expert on FP8 input has to do, and nothing the real experts need.
- "+ experts": the same round trip with this rank's real expert GEMMs in between (`Experts.forward`, called
  exactly as the MoE layer calls it: grouped fused kernel, or for deepep-ll the masked kernel on the FP8 rows
  and their scales), random weights of the model's shape (`--expert-weights`, DeepSeek-V3: fp8 128x128 blocks,
  intermediate 2048). At EP2 this column is dominated by reading E/2 experts' weights from HBM; it shows that
  the cost moved out of the deepep-ll dispatch did not reappear in the experts.
"nvlink" writes rows straight into the peers' memory (engine/distributed/nvlink.py); "nvlink-fp8" sends FP8 rows.
"symm-graph", "nvlink-graph" and "deepep-ll-graph" replay the round trip from a CUDA graph (launch overhead removed: what a
captured decode step pays; DeepEP's low-latency kernels are capturable, its normal ones are not). Reports the median and p90 over iterations of the slowest rank, in microseconds.
`--profile N`: then N more round trips of each backend under torch.profiler; rank 0 prints its kernels by GPU
time per round trip. `--chain N` runs N round trips back to back per timed iteration and reports the time per
round trip: a model step runs its MoE layers back to back, so the ranks' launch skew (paid again by every
single timed round trip after the barrier) is paid once per step, not once per layer.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist


def build(name: str, group, experts: int, hidden: int, tokens: int):
    if name == "a2a":
        from moefleet.engine.distributed.a2a import AllToAllDispatcher

        return AllToAllDispatcher(group, experts)
    if name.startswith("symm"):
        from moefleet.engine.distributed.symm import SymmDispatcher

        return SymmDispatcher(group, experts, hidden, tokens)
    if name.startswith("nvlink"):
        from moefleet.engine.distributed.nvlink import NvlinkDispatcher, workspace_pool

        device = torch.device("cuda", torch.cuda.current_device())
        fp8 = "-fp8" in name  # nvlink-fp8[-graph]: FP8 rows + scales (FP8 experts), else bf16 rows
        return NvlinkDispatcher(workspace_pool(group, device), experts, hidden, tokens, fp8_rows=fp8)
    from moefleet.engine.distributed.deepep import DeepEPDispatcher

    mode = "low_latency" if name.startswith("deepep-ll") else "normal"
    return DeepEPDispatcher(group, experts, hidden, mode=mode, max_tokens_per_rank=tokens)


def round_trip(dispatcher, x, ids, w, expert_layer=None):
    d = dispatcher.dispatch_finish(dispatcher.dispatch_start(x, ids, w))
    if expert_layer is None:  # identity experts (FP8 rows: dequantised on the valid rows only)
        out = d.real_rows(x.dtype)
    else:  # the MoE layer's call (engine/layers/moe.py stage_experts)
        out = expert_layer(
            d.hidden, d.tokens_per_expert, counts=d.counts, scales=d.scales, expected_rows=d.expected_rows
        )
    return dispatcher.combine_finish(dispatcher.combine_start(out, d))


def make_experts(kind: str, num_local: int, hidden: int, inter: int, device: torch.device):
    """This rank's experts with random weights of the given shape: fp8 (DeepSeek's 128x128 blocks) or bf16."""
    from moefleet.engine.layers.experts import Experts

    with torch.device("meta"):
        layer = Experts(range(num_local), hidden, inter)
    gen = torch.Generator(device).manual_seed(0)
    if kind == "fp8":
        # to_fp8 allocates fp8 weights + scales on w13's device with w13's leading (expert) dim
        layer.w13 = torch.nn.Parameter(torch.empty(num_local, 0, 0, device=device), requires_grad=False)
        layer.to_fp8((128, 128))
        assert layer.w13_scale_inv is not None and layer.w2_scale_inv is not None
        layer.w13_scale_inv.fill_(1 / (448 * 4))
        layer.w2_scale_inv.fill_(1 / (448 * 4))
    else:
        layer.w13 = torch.nn.Parameter(
            torch.empty(num_local, 2 * inter, hidden, dtype=torch.bfloat16, device=device), False
        )
        layer.w2 = torch.nn.Parameter(
            torch.empty(num_local, hidden, inter, dtype=torch.bfloat16, device=device), False
        )
    for weight, fan_in in ((layer.w13, hidden), (layer.w2, inter)):
        for e in range(num_local):  # one expert at a time: no giant float32 temporaries
            values = torch.randn(weight.shape[1:], generator=gen, device=device)
            values = values * 448 / 4 if kind == "fp8" else values / fan_in**0.5
            weight[e].copy_(values.clamp(-448, 448).to(weight.dtype))
    return layer


def time_backend(
    name, group, device, x, ids, w, experts, iters, warmup, expert_layer=None, profile_iters=0, chain=1
) -> list[float]:
    dispatcher = build(name, group, experts, x.shape[1], x.shape[0])

    def run():
        for _ in range(chain):
            round_trip(dispatcher, x, ids, w, expert_layer)

    for _ in range(warmup):
        run()
    torch.cuda.synchronize(device)
    if name.endswith("-graph"):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        torch.cuda.synchronize(device)
        run = graph.replay  # noqa: E731
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize(device)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) * 1000 / chain)
    if profile_iters:
        try:
            print_kernel_profile(name, run, profile_iters, chain, device)
        except Exception as exc:  # noqa: BLE001 - the timings above still stand
            print(f"rank {dist.get_rank()}: profiling {name} failed: {type(exc).__name__}: {exc}")
    return times


def print_kernel_profile(name, run, iters, chain, device) -> None:
    """Rank 0's kernels (CUPTI, graph replays included) by GPU time per round trip."""
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize(device)
    if dist.get_rank() != 0:
        return
    from moefleet.engine.bench.kernel_profile import kernel_table

    trips = iters * chain
    print(
        kernel_table(prof, trips, f"== kernels of {name}, rank 0, per round trip ({trips} profiled)", top=18)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", default="a2a,symm,symm-graph,deepep-normal,deepep-ll")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more round trips")
    parser.add_argument("--chain", type=int, default=1, metavar="N", help="round trips per timed iteration")
    parser.add_argument("--expert-weights", choices=("fp8", "bf16", "none"), default="fp8")
    parser.add_argument("--intermediate", type=int, default=2048, help="expert intermediate size")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    ids = torch.stack([torch.randperm(args.experts, generator=gen)[: args.top_k] for _ in range(args.tokens)])
    ids = ids.to(device)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, torch.bfloat16)
    w = torch.rand(args.tokens, args.top_k, generator=gen).to(device)
    expert_layer = None
    if args.expert_weights != "none":
        expert_layer = make_experts(
            args.expert_weights, args.experts // world, args.hidden, args.intermediate, device
        )

    def measure(name, layer) -> tuple[str, str, str]:
        try:
            times = time_backend(
                name, group, device, x, ids, w, args.experts, args.iters, args.warmup, layer, args.profile,
                args.chain,
            )  # fmt: skip
            stats = torch.tensor(
                [statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))]], device=device
            )
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            return f"{stats[0].item():.0f}", f"{stats[1].item():.0f}", ""
        except Exception as exc:  # a backend that is not installed or fails: say so in its row
            return "-", "-", f"{type(exc).__name__}: {str(exc)[:80]}"
        finally:
            dist.barrier()

    rows = []
    for name in args.backends.split(","):
        med, p90, note = measure(name, None)
        e_med, e_p90, e_note = measure(name, expert_layer) if expert_layer is not None else ("-", "-", "")
        notes = "; ".join(n for n in (note, e_note and f"+experts: {e_note}") if n) or "ok"
        rows.append((name, med, p90, e_med, e_p90, notes))
    if rank == 0:
        print(
            f"dispatch + combine per MoE layer: {args.tokens} tokens/GPU x hidden {args.hidden} bf16, top-{args.top_k} "
            f"of {args.experts} experts over {world} GPUs ({torch.cuda.get_device_name(device)}), slowest rank"
            + (f", per round trip of {args.chain} back to back" if args.chain > 1 else "")
        )
        experts_desc = (
            "none"
            if expert_layer is None
            else f"{args.experts // world} local experts, SwiGLU {args.hidden}->{args.intermediate}->{args.hidden}, "
            f"{args.expert_weights} weights"
        )
        print(f"identity = identity experts; + experts = with this rank's expert GEMMs ({experts_desc})")
        print(
            f"| {'backend':<14} | {'identity med us':>15} | {'p90 us':>7} | {'+ experts med us':>16} | {'p90 us':>7} | note"
        )
        print(f"|{'-' * 16}|{'-' * 17}|{'-' * 9}|{'-' * 18}|{'-' * 9}|------")
        for name, med, p90, e_med, e_p90, note in rows:
            print(f"| {name:<14} | {med:>15} | {p90:>7} | {e_med:>16} | {e_p90:>7} | {note}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
