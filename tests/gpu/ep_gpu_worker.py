"""One rank of the 2-GPU dispatcher checks, run by tests/gpu/test_ep_backends_gpu.py under torchrun:

    python3 -m torch.distributed.run --nproc-per-node 2 tests/gpu/ep_gpu_worker.py BACKEND

BACKEND: symm | nvlink | nvlink_fp8 (FP8 rows) | deepep_normal | deepep_ll | deepep_ll_bf16 (bf16 rows) | a2a. For each routing (random, skewed, empty rank, padded, maximal:
every hit to the last rank) a dispatch -> stand-in experts (expert g scales its rows by 1 + g / 8) -> combine
round trip is compared with the dense formula sum_k w * x * (1 + id / 8) computed on this rank. For symm and nvlink also:
the round trip runs with CUDA's sync debug mode set to "error" (no host synchronisation) and is captured in a
CUDA graph whose replays on new inputs equal the formula. For deepep_ll also: the FP8 rows + scales go through
the real Experts layer (masked fused kernel, no dequantisation of the buffer) on the same five routings,
against the dense SwiGLU formula, and once under sync debug mode "error". Prints PASS/FAIL lines; exits 1 on any failure.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist


def stand_in_experts(rows: torch.Tensor, counts: torch.Tensor, first_expert: int) -> torch.Tensor:
    """Sync-free: expert g multiplies its rows by 1 + g / 8 (grouped [N, D] or masked [L, C, D] layout)."""
    num_local = counts.shape[0]
    scale = 1 + (first_expert + torch.arange(num_local, device=rows.device, dtype=torch.float32)) / 8
    if rows.dim() == 3:
        return (rows.float() * scale[:, None, None]).to(rows.dtype)
    ends = torch.cumsum(counts.to(torch.int64), 0)
    expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device), right=True)
    return (rows.float() * scale[expert.clamp(max=num_local - 1)][:, None]).to(rows.dtype)


def routing(kind: str, rank: int, world: int, tokens: int, top_k: int, experts: int, gen: torch.Generator):
    t = 0 if kind == "empty" and rank == 0 else tokens
    if t == 0:
        return torch.zeros(0, top_k, dtype=torch.int64)
    pool = experts // world if kind == "maximal" else experts
    if (
        kind == "skewed"
    ):  # every token's first hit on expert 0, the others distinct (a router never repeats one)
        rest = [1 + torch.randperm(experts - 1, generator=gen)[: top_k - 1] for _ in range(t)]
        return torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64), r]) for r in rest])
    ids = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(t)])
    if kind == "maximal":
        ids += experts - pool  # every hit of every rank goes to the last rank
    if kind == "padded":
        ids[::2, -1] = -1
    return ids


def expected(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    scale = torch.where(ids >= 0, 1 + ids.float() / 8, torch.zeros_like(w))
    return (x.float()[:, None, :] * (w * scale)[..., None]).sum(1)


def round_trip(dispatcher, x, ids, w, first_expert):
    d = dispatcher.dispatch_finish(dispatcher.dispatch_start(x, ids, w))
    out = stand_in_experts(  # deepep_ll's FP8 rows: dequantised (valid rows only) for the stand-ins
        d.real_rows(x.dtype), d.counts if d.counts is not None else _host_counts(d, x.device), first_expert
    )
    return dispatcher.combine_finish(dispatcher.combine_start(out, d))


def _host_counts(d, device):
    return torch.tensor(d.tokens_per_expert, device=device)


def make(backend: str, group, experts: int, hidden: int, max_tokens: int):
    if backend == "symm":
        from moefleet.engine.distributed.symm import SymmDispatcher

        return SymmDispatcher(group, experts, hidden, max_tokens)
    if backend.startswith("nvlink"):
        from moefleet.engine.distributed.nvlink import NvlinkDispatcher, workspace_pool

        device = torch.device("cuda", torch.cuda.current_device())
        fp8 = backend == "nvlink_fp8"  # FP8 rows + scales: what FP8 experts get
        return NvlinkDispatcher(workspace_pool(group, device), experts, hidden, max_tokens, fp8_rows=fp8)
    if backend == "a2a":
        from moefleet.engine.distributed.a2a import AllToAllDispatcher

        return AllToAllDispatcher(group, experts)
    from moefleet.engine.distributed.deepep import DeepEPDispatcher

    mode = "low_latency" if backend.startswith("deepep_ll") else "normal"
    ll_fp8 = backend != "deepep_ll_bf16"  # bf16 rows: what a bf16 model's experts get from DeepEP LL
    return DeepEPDispatcher(group, experts, hidden, mode=mode, max_tokens_per_rank=max_tokens, ll_fp8=ll_fp8)


def main() -> int:
    backend = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    failures = 0
    shapes = {  # (dtype, tokens, top_k, experts, hidden, tolerance)
        "symm": [(torch.float32, 12, 3, 8, 64, 1e-5), (torch.bfloat16, 256, 8, 256, 7168, 2e-2)],
        "nvlink": [(torch.float32, 12, 3, 8, 64, 1e-5), (torch.bfloat16, 256, 8, 256, 7168, 2e-2)],
        "nvlink_fp8": [(torch.bfloat16, 256, 8, 256, 7168, 0.1)],
        "a2a": [(torch.float32, 12, 3, 8, 64, 1e-5)],
        # one deep_ep.Buffer per process, so one shape per DeepEP run (the tiny width runs in the serve test)
        "deepep_normal": [(torch.bfloat16, 256, 8, 256, 7168, 2e-2)],
        "deepep_ll": [(torch.bfloat16, 128, 8, 256, 7168, 0.1)],
        "deepep_ll_bf16": [(torch.bfloat16, 128, 8, 256, 7168, 2e-2)],
    }[backend]
    for dtype, tokens, top_k, experts, hidden, tol in shapes:
        dispatcher = make(backend, group, experts, hidden, tokens)
        first = rank * (experts // world)
        for kind in ("random", "skewed", "empty", "padded", "maximal"):
            name = f"{backend} {kind} T={tokens} D={hidden} {dtype}"
            try:
                gen = torch.Generator().manual_seed(100 * rank + len(kind))
                ids = routing(kind, rank, world, tokens, top_k, experts, gen).to(device)
                x = torch.randn(ids.shape[0], hidden, generator=gen).to(device, dtype)
                w = torch.rand(ids.shape, generator=gen).to(device)
                got = round_trip(dispatcher, x, ids, w, first).float()
                want = expected(x, ids, w)
                err = (
                    float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
                    if want.numel()
                    else 0.0
                )
                status = "PASS" if err <= tol else "FAIL"
                failures += status == "FAIL"
                print(f"[rank {rank}] {status} {name}: max rel err {err:.2e} (tol {tol})", flush=True)
            except Exception:
                failures += 1
                print(f"[rank {rank}] FAIL {name}:\n{traceback.format_exc()}", flush=True)
            dist.barrier()
    if backend in ("symm", "nvlink"):
        failures += graph_check(group, rank, world, device, backend)
    if backend == "deepep_ll":
        failures += ll_experts_check(group, rank, world, device)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


def ll_experts_check(group, rank: int, world: int, device: torch.device) -> int:
    """DeepEP low-latency with this rank's REAL experts (`Experts.forward` on the FP8 rows and their scales,
    exactly as the MoE layer calls it) against the dense formula on every rank: sum_k w * expert_id(qdq(x)),
    with qdq = the per-token-per-128 FP8 quantisation (fp8_blocks reference) and float32 math on the same bf16
    weights. Tolerance: relative L2 error <= 3e-2 (bf16 intermediate and output; DeepEP's and the reference's
    FP8 rounding may differ by one e4m3 step on a few elements). The round trip also runs with CUDA's sync
    debug mode "error" (no host synchronisation on the dispatch -> experts -> combine path)."""
    import torch.nn.functional as F
    from moefleet.engine.kernels.fp8_blocks import quantize_per_token_group_reference
    from moefleet.engine.layers.experts import Experts

    tokens, top_k, experts, hidden, inter = 128, 8, 256, 7168, 256
    num_local = experts // world
    first = rank * num_local
    dispatcher = make("deepep_ll", group, experts, hidden, tokens)
    gen = torch.Generator(device=device).manual_seed(77)  # the same weights on every rank
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5).to(
        torch.bfloat16
    )
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device=device) / inter**0.5).to(torch.bfloat16)
    with torch.device("meta"):
        layer = Experts(range(first, first + num_local), hidden, inter)
    layer.w13 = torch.nn.Parameter(w13[first : first + num_local].clone(), requires_grad=False)
    layer.w2 = torch.nn.Parameter(w2[first : first + num_local].clone(), requires_grad=False)

    def trip(x, ids, w):
        d = dispatcher.dispatch_finish(dispatcher.dispatch_start(x, ids, w, is_prefill=False))
        out = layer(
            d.hidden, d.tokens_per_expert, counts=d.counts, scales=d.scales, expected_rows=d.expected_rows
        )
        return dispatcher.combine_finish(dispatcher.combine_start(out, d)), d

    failures = 0
    for kind in ("random", "skewed", "empty", "padded", "maximal"):
        name = f"deepep_ll real experts {kind} T={tokens} D={hidden} I={inter}"
        try:
            g = torch.Generator().manual_seed(500 + 100 * rank + len(kind))
            ids = routing(kind, rank, world, tokens, top_k, experts, g).to(device)
            x = torch.randn(ids.shape[0], hidden, generator=g).to(device, torch.bfloat16)
            w = torch.rand(ids.shape, generator=g).to(device)
            got, d = trip(x, ids, w)
            assert d.hidden.dtype == torch.float8_e4m3fn and d.scales is not None, (
                "LL rows are not FP8 + scales"
            )
            q, sc = quantize_per_token_group_reference(x, 128)
            a = q.float() * sc.repeat_interleave(128, 1)
            want = torch.zeros(ids.shape[0], hidden, device=device)
            for k in range(top_k):
                for e in ids[:, k].unique().tolist():
                    if e < 0:
                        continue
                    rows = (ids[:, k] == e).nonzero().flatten()
                    h = F.silu(a[rows] @ w13[e, :inter].float().T) * (a[rows] @ w13[e, inter:].float().T)
                    want[rows] += w[rows, k : k + 1] * (h @ w2[e].float().T)
            err = float((got.float() - want).norm() / want.norm().clamp_min(1e-6)) if want.numel() else 0.0
            ok = err <= 3e-2 and bool(torch.isfinite(got.float()).all())
            failures += not ok
            print(
                f"[rank {rank}] {'PASS' if ok else 'FAIL'} {name}: rel L2 err {err:.2e} (tol 3e-2)",
                flush=True,
            )
        except Exception:
            failures += 1
            print(f"[rank {rank}] FAIL {name}:\n{traceback.format_exc()}", flush=True)
        dist.barrier()
    try:
        g = torch.Generator().manual_seed(900 + rank)
        ids = routing("random", rank, world, tokens, top_k, experts, g).to(device)
        x = torch.randn(ids.shape[0], hidden, generator=g).to(device, torch.bfloat16)
        w = torch.rand(ids.shape, generator=g).to(device)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            trip(x, ids, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        print(
            f"[rank {rank}] PASS deepep_ll dispatch -> real experts -> combine without host synchronisation"
        )
    except Exception:
        failures += 1
        print(f"[rank {rank}] FAIL deepep_ll sync-free round trip:\n{traceback.format_exc()}", flush=True)
    dist.barrier()
    return failures


def graph_check(group, rank: int, world: int, device: torch.device, backend: str) -> int:
    """No host sync in an eager round trip; then a CUDA graph of dispatch + experts + combine replays right."""
    tokens, top_k, experts, hidden = 16, 4, 8, 128
    dispatcher = make(backend, group, experts, hidden, tokens)
    first = rank * (experts // world)
    static_x = torch.zeros(tokens, hidden, device=device)
    static_ids = torch.zeros(tokens, top_k, dtype=torch.int64, device=device)
    static_w = torch.zeros(tokens, top_k, device=device)

    def fill(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed * 10 + rank)
        static_ids.copy_(torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]))
        static_x.copy_(torch.randn(tokens, hidden, generator=gen))
        static_w.copy_(torch.rand(tokens, top_k, generator=gen))

    failures = 0
    try:
        fill(0)
        round_trip(dispatcher, static_x, static_ids, static_w, first)  # allocate buffers, compile kernels
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            round_trip(dispatcher, static_x, static_ids, static_w, first)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        print(f"[rank {rank}] PASS {backend} round trip without host synchronisation", flush=True)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            round_trip(dispatcher, static_x, static_ids, static_w, first)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_out = round_trip(dispatcher, static_x, static_ids, static_w, first)
        torch.cuda.synchronize(device)
        dist.barrier()
        for seed in (1, 2, 3):
            fill(seed)
            graph.replay()
            torch.cuda.synchronize(device)
            err = float((static_out.float() - expected(static_x, static_ids, static_w)).abs().max())
            ok = err < 1e-4
            failures += not ok
            print(
                f"[rank {rank}] {'PASS' if ok else 'FAIL'} {backend} CUDA graph replay {seed}: max abs err {err:.2e}"
            )
            dist.barrier()
    except Exception:
        failures += 1
        print(f"[rank {rank}] FAIL {backend} graph check:\n{traceback.format_exc()}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
