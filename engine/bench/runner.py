"""One rank of `moefleet bench`: build a preset on random weights, time decode or prefill steps.

Data flow: preset config -> (EP group, layout) -> model on device with random weights -> EP dispatchers ->
KV cache for the scenario -> warm-up, timed steps (no instrumentation), then instrumented steps for the
per-part breakdown. Every step is what the engine does per step: build a new ForwardBatch from host lists
(prepare), forward, logits of the sampled rows, greedy sample read back to the host. Decode steps keep
every sequence at the same KV length (a steady-state step; the new token's slot is rewritten each step).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from moefleet.engine import topology
from moefleet.engine.attention import create_attention_backend
from moefleet.engine.bench.floor import decode_step_bytes
from moefleet.engine.bench.flops import forward_flops, peak_flops
from moefleet.engine.bench.presets import num_experts, preset_config
from moefleet.engine.cuda_graph_runner import CudaGraphRunner, decide_cuda_graphs
from moefleet.engine.dispatch_metrics import paused
from moefleet.engine.forward_batch import ForwardBatch
from moefleet.engine.layers.experts import Experts
from torch import nn


@dataclass(frozen=True, slots=True)
class BenchOptions:
    preset: str = "deepseek-v3"
    num_layers: int = 4
    dense_layers: int = 0
    mode: str = "decode"  # "decode" or "prefill"
    batch_size: int = 64  # decode: sequences per rank
    kv_len: int = 1024  # decode: cached tokens per sequence
    prefill_tokens: int = 4096  # prefill: new tokens per rank per step
    prefill_seq_len: int = 1024
    steps: int = 10
    warmup: int = 3
    device: str = "cuda"
    dtype: str = "bfloat16"
    quantization: str = "none"  # "fp8": linears and experts quantised to 128x128 block FP8 after random init
    # "auto": torch's cuBLAS/CUTLASS GEMMs where verified (blockwise FP8 scaled_mm, bf16 grouped_mm), else
    # Triton; "triton": the Triton kernels only (side-by-side runs)
    gemm_backend: str = "auto"
    backend: str = "auto"
    attention_backend: str = "auto"  # auto: triton on CUDA, torch on CPU
    cuda_graphs: str = "auto"  # auto: decode steps replay CUDA graphs when capturable (CUDA, triton)
    peak_tflops: float | None = None  # for prefill MFU; None: from the device name (flops.py)
    block_size: int = 64
    kv_memory_fraction: float = 0.9
    breakdown: bool = True
    seed: int = 0
    routing_skew: str = ""  # "zipf:S": synthetic skew injected at the router (moefleet.engine.eplb.bench)
    num_redundant_experts: int = 0  # EPLB spare slots
    eplb: bool = False  # rebalance after the timed steps, then time again
    tbo: str = "auto"  # two-batch overlap: on / off / auto (off until measured thresholds exist, tbo.py)
    emulate_ep: int = 0  # > 0: each GPU does the per-GPU work of an N-way EP deployment (emulate.py)
    # 3 profiled graph replays' kernel timeline (decode graphs, trace_timeline.py) and one more eager TBO step
    # with per-stage timing (tbo_timeline.py)
    tbo_timeline: bool = False
    # with tbo_timeline: also write the profiled steps' Chrome trace here (gzip when it ends in .gz; rank 0)
    trace_out: str = ""
    # --emulate-ep on one GPU: a GPU wait per dispatch and per combine (emulate.py)
    emulate_comm_us: float = 0.0
    # > 0: the serving path's sampled MoE dispatch/combine metrics (dispatch_metrics.py), one forward in N,
    # installed before the graphs are captured as `moefleet serve` does: their cost side by side with 0 (off)
    moe_metrics_every: int = 0
    # > 0: that many more timed-path steps under torch.profiler (every rank), kernels printed by rank 0
    profile_steps: int = 0

    @property
    def tokens_per_step(self) -> int:
        """Tokens one GPU forwards per step: decode sequences, or prefill tokens."""
        return self.batch_size if self.mode == "decode" else self.prefill_tokens

    def __post_init__(self) -> None:
        if self.mode not in ("decode", "prefill"):
            raise ValueError(f"mode ({self.mode!r}) must be 'decode' or 'prefill'")
        for name in ("batch_size", "kv_len", "prefill_tokens", "prefill_seq_len", "steps", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        from moefleet.engine.eplb.bench import parse_skew

        parse_skew(self.routing_skew)
        from moefleet.engine.tbo import wants_tbo

        wants_tbo(self.tbo, 0, False)  # validates the mode
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts ({self.num_redundant_experts}) must be >= 0")
        if self.emulate_ep < 0:
            raise ValueError(f"--emulate-ep ({self.emulate_ep}) must be >= 1 (or 0: off)")
        if self.emulate_comm_us < 0:
            raise ValueError(f"--emulate-comm-us ({self.emulate_comm_us}) must be >= 0")
        if self.emulate_comm_us and (not self.emulate_ep or self.device != "cuda"):
            raise ValueError(
                "--emulate-comm-us stands for the transfers of an --emulate-ep deployment on one CUDA GPU: add "
                "--emulate-ep N (and --device cuda), or drop it"
            )
        if self.trace_out and not self.tbo_timeline:
            raise ValueError(
                "--trace-out writes the trace of --tbo-timeline's profiled steps: add --tbo-timeline"
            )
        if self.moe_metrics_every < 0:
            raise ValueError(f"--moe-metrics-every ({self.moe_metrics_every}) must be >= 0 (0: off)")
        if self.emulate_ep and self.eplb:
            raise ValueError("--eplb rebalances a real group: it cannot run with --emulate-ep")
        if self.prefill_tokens % self.prefill_seq_len:
            raise ValueError(
                f"prefill_tokens ({self.prefill_tokens}) must be a multiple of prefill_seq_len "
                f"({self.prefill_seq_len})"
            )


@dataclass
class RankResult:
    rank: int
    world_size: int
    device_name: str
    tokens_per_step: int
    step_times_s: list[float]
    breakdown_s: dict[str, float] = field(default_factory=dict)
    kv_capacity_tokens: int = 0
    bandwidth_bytes_per_s: float = 0.0
    floor_bytes: dict[str, int] = field(default_factory=dict)
    prepare_times_s: list[float] = field(default_factory=list)  # host time building each ForwardBatch
    flops_per_step: int = 0
    peak_flops: float | None = None
    attention_backend: str = ""
    cuda_graphs: str = ""
    # Synchronising CUDA calls in one timed-path step (torch's sync debug mode); None off CUDA.
    host_syncs_per_step: int | None = None
    emulated_ep: int = 0  # --emulate-ep: the deployment's EP size each GPU (of world_size) stands for
    experts_per_gpu: int = 0  # routed expert slots per MoE layer on this GPU
    routed_rows_per_layer: int = 0  # (token, expert) rows this GPU's experts compute per MoE layer (expected)
    # Measured in one eager check step (EP group or --emulate-ep; received.py): rows this GPU's experts got,
    # per local slot summed over MoE layers, and per MoE layer
    received_rows_per_slot: list[int] = field(default_factory=list)
    received_rows_per_layer: float = 0.0

    @property
    def prepare_time_s(self) -> float:
        return statistics.median(self.prepare_times_s) if self.prepare_times_s else 0.0

    eplb: dict[str, Any] = field(default_factory=dict)  # --eplb: before/after a rebalance
    # --tbo-timeline: overlap_summary of one eager TBO step and its stage spans (tbo_timeline.py)
    tbo_timeline: dict[str, Any] = field(default_factory=dict)
    # --tbo-timeline with CUDA graphs: the profiled graph replays' timeline (trace_timeline.graph_timeline)
    graph_timeline: dict[str, Any] = field(default_factory=dict)
    # --moe-metrics-every: what the sampled dispatch/combine metrics recorded over the timed steps
    moe_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def step_time_s(self) -> float:
        return statistics.median(self.step_times_s)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step_time_s": self.step_time_s, "prepare_time_s": self.prepare_time_s}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_host_syncs(fn: Callable[[], Any]) -> int:
    """How many synchronising CUDA operations `fn` issues (copies to the host, stream syncs, ...): torch's
    sync debug mode warns once per such call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def random_init(model: nn.Module, seed: int, checkpoint_dtype: torch.dtype | None = None) -> None:
    """Fill parameters in place: matrices ~ N(0, 0.02), vectors (norms) 1, router biases 0.
    `checkpoint_dtype` (bf16 / fp16 runs): float32 matrices (the sigmoid gate, kept in float32 like the
    reference) get values of that dtype, as a checkpoint stored in it gives them (DeepSeek-V3's gate is bf16)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                # Draw on the device in chunks (full-width expert stacks are tens of GB).
                for chunk in param.view(param.shape[0], -1).split(8, dim=0):
                    chunk.normal_(0.0, 0.02)
                    if checkpoint_dtype is not None and chunk.dtype == torch.float32:
                        chunk.copy_(chunk.to(checkpoint_dtype))
            elif "bias" in name:
                param.zero_()
            else:
                param.fill_(1.0)


def measure_bandwidth(device: torch.device, size_bytes: int) -> float:
    """Device memory bandwidth from a copy: bytes read + bytes written per second (median of repeats)."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * size_bytes / statistics.median(times)


class PartTimer:
    """Accumulates synchronised wall time per model part (instrumented steps only: it adds syncs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, part: str) -> None:
        _sync(self.device)
        self._started[part] = time.perf_counter()

    def stop(self, part: str) -> None:
        _sync(self.device)
        self.totals[part] = self.totals.get(part, 0.0) + time.perf_counter() - self._started.pop(part)

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.start(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(part)

        return wrapper


class _TimedDispatcher:
    """Wraps a TokenDispatcher so launch + wait of dispatch and combine are timed as parts."""

    def __init__(self, inner: Any, timer: PartTimer):
        self.inner = inner
        self.dispatch_start = timer.timed("dispatch", inner.dispatch_start)
        self.dispatch_finish = timer.timed("dispatch", inner.dispatch_finish)
        self.combine_start = timer.timed("combine", inner.combine_start)
        self.combine_finish = timer.timed("combine", inner.combine_finish)


def instrument(model: nn.Module, timer: PartTimer) -> Callable[[], None]:
    """Time attention, experts, dispatch and combine; returns a function that removes the instrumentation."""
    handles = []
    restore: list[tuple[nn.Module, Any]] = []
    for module in model.modules():
        part = (
            "attention"
            if hasattr(module, "kv_cache_shape")
            else "experts"
            if isinstance(module, Experts)
            else None
        )
        if part is not None:
            handles.append(module.register_forward_pre_hook(lambda _m, _a, p=part: timer.start(p)))
            handles.append(module.register_forward_hook(lambda _m, _a, _o, p=part: timer.stop(p)))
        if hasattr(module, "dispatcher") and isinstance(getattr(module, "experts", None), Experts):
            restore.append((module, module.dispatcher))
            setattr(module, "dispatcher", _TimedDispatcher(module.dispatcher, timer))  # noqa: B010

    def remove() -> None:
        for handle in handles:
            handle.remove()
        for module, dispatcher in restore:
            setattr(module, "dispatcher", dispatcher)  # noqa: B010

    return remove


def parameter_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(routed expert bytes on this rank, input embedding bytes, all other parameter bytes)."""
    routed = embedding = other = 0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embed_tokens = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed_tokens is not None and hasattr(embed_tokens, "weight"):
        embeddings.add(id(embed_tokens.weight))
    routed_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    for param in model.parameters():
        size = param.numel() * param.element_size()
        if id(param) in routed_ids:
            routed += size
        elif id(param) in embeddings:
            embedding += size
        else:
            other += size
    return routed, embedding, other


@dataclass(frozen=True, slots=True)
class Scenario:
    """Host lists of one step of the scenario (what the scheduler would hand the model runner)."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    num_blocks: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def build_scenario(options: BenchOptions, vocab_size: int) -> Scenario:
    """Decode: B sequences at kv_len cached tokens computing one more; prefill: whole prompts of seq_len."""
    bs = options.block_size
    if options.mode == "decode":
        num_seqs, query_len, seq_len = options.batch_size, 1, options.kv_len + 1
    else:
        num_seqs = options.prefill_tokens // options.prefill_seq_len
        query_len = seq_len = options.prefill_seq_len
    blocks_per_seq = math.ceil(seq_len / bs)
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(num_seqs)]
    generator = torch.Generator().manual_seed(options.seed)
    input_ids = torch.randint(0, vocab_size, (num_seqs * query_len,), generator=generator).tolist()
    return Scenario(
        input_ids=input_ids,
        positions=list(range(seq_len - query_len, seq_len)) * num_seqs,
        query_lens=[query_len] * num_seqs,
        seq_lens=[seq_len] * num_seqs,
        block_tables=tables,
        num_blocks=num_seqs * blocks_per_seq,
    )


def prepare(scenario: Scenario, options: BenchOptions, device: torch.device, backend: Any) -> ForwardBatch:
    """A new ForwardBatch for one step, as ModelRunner.prepare builds it."""
    return ForwardBatch.build(
        input_ids=scenario.input_ids,
        positions=scenario.positions,
        query_lens=scenario.query_lens,
        seq_lens=scenario.seq_lens,
        block_tables=scenario.block_tables,
        block_size=options.block_size,
        device=device,
        attn_backend=backend,
    )


def run_rank(options: BenchOptions, group: Any = None) -> RankResult:
    """Benchmark this rank (of `group`, an EP process group, or alone when None)."""
    import torch.distributed as dist
    from moefleet.engine.distributed.ep import (
        apply_expert_parallel,
        has_fp8_experts,
        set_expert_parallel_layout,
    )
    from moefleet.engine.layers.router import prepare_gates
    from moefleet.engine.loader import build_model, dtype_from_name
    from moefleet.engine.tbo import forward_tbo, num_micro_batches, wants_tbo

    rank = 0 if group is None else dist.get_rank(group)
    world_size = 1 if group is None else dist.get_world_size(group)
    device = (
        torch.device(options.device, torch.cuda.current_device())
        if options.device == "cuda"
        else torch.device("cpu")
    )
    torch.manual_seed(options.seed + rank)
    config = preset_config(options.preset, options.num_layers, options.dense_layers)
    if options.emulate_ep:
        from moefleet.engine.bench.emulate import emulated_shape

        emulated_shape(options, world_size)  # W <= N, top_k <= W x L: refused before any model is built
        # Rank r of the W real GPUs builds rank r's slots of the N-way deployment (emulate.py).
        topology.set_current(
            topology.Topology.for_rank(
                rank, options.emulate_ep, num_redundant_experts=options.num_redundant_experts
            )
        )
    else:
        set_expert_parallel_layout(group, options.num_redundant_experts)
    try:
        model = build_model(config, device, options.dtype)
    finally:
        topology.set_current(topology.Topology())
    dtype = dtype_from_name(options.dtype)
    random_init(model, options.seed, dtype if dtype in (torch.bfloat16, torch.float16) else None)
    prepare_gates(model)
    if options.quantization == "fp8":
        from moefleet.engine.fp8_weights import quantize_model

        quantize_model(model)
    from moefleet.engine.gemm_backend import set_gemm_backend

    set_gemm_backend(model, options.gemm_backend)  # "triton": our Triton GEMMs only (side by side)
    if group is not None:
        from moefleet.engine.bench.emulate import emulated_routing
        from moefleet.engine.distributed.backends import make_dispatcher

        micro_batches = num_micro_batches(options.tbo)
        # --emulate-ep N on W GPUs: the real dispatchers of the group over its W x L slots, each behind a
        # balanced rewrite of the router's ids (emulate.py); the layers were built for N ranks
        make = emulated_routing(make_dispatcher, rank, world_size) if options.emulate_ep else make_dispatcher
        apply_expert_parallel(
            model,
            group,
            options.backend,
            num_micro_batches=micro_batches,
            make=make,
            built_for_size=options.emulate_ep or None,
            hidden_size=int(config["hidden_size"]),
            device_type=device.type,
            # the most tokens this rank forwards in one step (symm sizes its buffers from it)
            max_tokens_per_rank=options.tokens_per_step,
            top_k=int(config["num_experts_per_tok"]),
            dtype=options.dtype,
            device=device,
            micro_batches=micro_batches,
            deepep_ll_fp8=has_fp8_experts(model),  # the serving rule: FP8 rows for FP8 experts only
            # nvlink sizes its decode buffers from the bench batch
            max_decode_tokens=options.batch_size if options.mode == "decode" else 0,
        )
    asked_comm_us = 0.0  # --emulate-comm-us: the emulated transfer time a step asks for (dispatch + combine)
    if options.emulate_ep and group is None:
        from moefleet.engine.bench.emulate import install_emulated_dispatchers

        wait = None
        if options.emulate_comm_us:
            from moefleet.engine.kernels.gpu_wait import choose_wait

            wait, how = choose_wait(device)
            print(f"rank {rank}: emulated transfers: {how}", file=sys.stderr, flush=True)
        moe_count = install_emulated_dispatchers(
            model, num_micro_batches(options.tbo), options.emulate_comm_us, options.tokens_per_step, wait
        )
        asked_comm_us = 2 * moe_count * options.emulate_comm_us
    metrics = install_moe_metrics(model, options.moe_metrics_every)
    from moefleet.engine.eplb import bench as eplb_bench

    skew = eplb_bench.parse_skew(options.routing_skew)
    if skew:
        eplb_bench.apply_routing_skew(model, skew, rank, options.seed)
    recorder = eplb_bench.attach_recorder(model, 10**9) if options.eplb else None

    attention = [m for m in model.modules() if hasattr(m, "kv_cache_shape")]
    element = torch.empty((), dtype=dtype).element_size()
    kv_bytes_per_token = sum(math.prod(m.kv_cache_shape(1, 1)) * element for m in attention)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        kv_capacity = int(free * options.kv_memory_fraction) // kv_bytes_per_token
    else:
        kv_capacity = 0
    scenario = build_scenario(options, int(config["vocab_size"]))
    for m in attention:
        shape = m.kv_cache_shape(scenario.num_blocks, options.block_size)
        m.kv_cache = torch.randn(shape, dtype=dtype, device=device)
    backend = create_attention_backend(options.attention_backend, device, options.block_size)
    graphs, graphs_why = None, "off: prefill" if options.mode == "prefill" else ""
    # Every rank runs the same shapes, so each decides alike (no step agreement needed here).
    use_tbo = wants_tbo(options.tbo, scenario.num_tokens, options.mode == "prefill")
    if use_tbo:
        from moefleet.engine.tbo_streams import choose_mechanism, dispatcher_overlaps

        mechanism, why = choose_mechanism(device.type, dispatcher_overlaps(model))
        print(f"rank {rank}: TBO overlap {mechanism} ({why})", file=sys.stderr, flush=True)
    if options.mode == "decode":
        with paused(metrics):  # capture: not a sample
            graphs, graphs_why = _capture_decode_graph(
                model, backend, options, scenario, device, group, tbo=use_tbo
            )
    print(f"rank {rank}: CUDA graphs {graphs_why}", file=sys.stderr, flush=True)
    prepare_times: list[float] = []

    def step(eager: bool = False, timer: Any = None, batch: ForwardBatch | None = None) -> None:
        """What the engine does per step: prepare a new batch (unless given), forward, logits, greedy sample to
        the host."""
        if batch is None:
            start = time.perf_counter()
            batch = prepare(scenario, options, device, backend)
            prepare_times.append(time.perf_counter() - start)
        if graphs is not None and not eager:
            logits = graphs.replay(batch)
        elif use_tbo:
            hidden, _ = forward_tbo(model, batch, timer=timer)
            logits = model.compute_logits(hidden[batch.sample_indices])
        else:
            hidden = model(batch.input_ids, batch.positions, batch)
            logits = model.compute_logits(hidden[batch.sample_indices])
        logits.argmax(dim=-1).tolist()  # the step's one host sync: sampled tokens

    def barrier() -> None:
        if group is not None:
            dist.barrier(group)

    with torch.inference_mode():
        with paused(metrics):
            for _ in range(options.warmup):
                step()
        barrier()
        prepare_times.clear()
        times = []
        for _ in range(options.steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        timed_prepare = list(prepare_times)
        moe_metrics = summarize_moe_metrics(metrics, rank) if metrics is not None else {}
        if options.profile_steps and device.type == "cuda":  # every rank steps (collectives), rank 0 prints
            print_kernel_profile(step, options.profile_steps, device, show=rank == 0)
        graph_timeline: dict[str, Any] = {}
        if options.tbo_timeline and device.type == "cuda":  # the timed path's kernels per stream: graph
            # replays, or eager steps (prefill); the eager stage-by-stage TBO timeline comes later
            batches = [prepare(scenario, options, device, backend) for _ in range(GRAPH_TIMELINE_STEPS)]
            graph_timeline = graph_timeline_steps(
                lambda b: step(batch=b),
                batches,
                device,
                barrier,
                rank,
                asked_comm_us,
                label="graph replays" if graphs is not None else "eager steps",
                trace_out=options.trace_out if rank == 0 else "",
            )
        breakdown: dict[str, float] = {}
        if options.breakdown and not use_tbo:  # per-part times of an interleaved step would mislead
            timer = PartTimer(device)
            remove = instrument(model, timer)
            steps = max(2, options.steps // 2)
            total = 0.0
            for _ in range(steps):
                barrier()
                _sync(device)
                start = time.perf_counter()
                step(eager=True)  # hooks do not fire inside a graph replay
                _sync(device)
                total += time.perf_counter() - start
            remove()
            breakdown = {part: t / steps for part, t in timer.totals.items()}
            breakdown["other"] = max(0.0, total / steps - sum(breakdown.values()))
            breakdown["instrumented_step"] = total / steps
        syncs = count_host_syncs(step) if device.type == "cuda" else None
        eplb: dict[str, Any] = {}
        if recorder is not None:
            eplb = eplb_bench.rebalance(
                model,
                recorder,
                group,
                options.num_redundant_experts,
                num_groups=int(config.get("n_group") or 1),
            )
            location = eplb.pop("location")
            for _ in range(options.warmup):
                step()
            barrier()
            after = []
            for _ in range(options.steps):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                after.append(time.perf_counter() - start)
            eplb["step_times_before_s"] = times
            eplb["step_times_after_s"] = after
            eplb["balancedness_after"] = eplb_bench.measured_balancedness(
                recorder.read(group), location, world_size
            )
        timeline = tbo_timeline_step(step, device, barrier, rank) if use_tbo and options.tbo_timeline else {}
        received = None
        if group is not None or options.emulate_ep:  # where the routed rows went: one eager check step
            # (after the timed and --eplb steps: it perturbs none of them)
            from moefleet.engine.bench.received import count_received_rows

            barrier()
            received = count_received_rows(model, lambda: step(eager=True))
        bandwidth = measure_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)

    routed, embedding, other = parameter_bytes(model)
    floor = decode_step_bytes(
        dense_weight_bytes=other,
        local_routed_expert_bytes=routed,
        batch_per_rank=options.batch_size,
        # --emulate-ep: each GPU (one or W) does one deployment GPU's work, so the group is the deployment's
        world_size=options.emulate_ep or world_size,
        top_k=int(config["num_experts_per_tok"]),
        num_experts=num_experts(config),
        kv_bytes_per_token=kv_bytes_per_token,
        kv_len=options.kv_len,
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = options.peak_tflops * 1e12 if options.peak_tflops else peak_flops(device_name)
    return RankResult(
        rank=rank,
        world_size=world_size,
        device_name=device_name,
        tokens_per_step=scenario.num_tokens,
        step_times_s=times,
        breakdown_s=breakdown,
        kv_capacity_tokens=kv_capacity,
        bandwidth_bytes_per_s=bandwidth,
        floor_bytes={
            "dense_weights": floor.dense_weights,
            "routed_experts": floor.routed_experts,
            "kv_cache": floor.kv_cache,
            "total": floor.total,
        },
        prepare_times_s=timed_prepare,
        flops_per_step=forward_flops(
            config, scenario.query_lens, scenario.seq_lens, num_sampled=len(scenario.query_lens)
        ),
        peak_flops=peak,
        attention_backend=backend.name,
        cuda_graphs=graphs_why,
        host_syncs_per_step=syncs,
        eplb=eplb,
        tbo_timeline=timeline,
        graph_timeline=graph_timeline,
        moe_metrics=moe_metrics,
        emulated_ep=options.emulate_ep,
        experts_per_gpu=_experts_per_gpu(model),
        routed_rows_per_layer=scenario.num_tokens * int(config["num_experts_per_tok"]),
        received_rows_per_slot=[] if received is None else received.per_slot,
        received_rows_per_layer=0.0 if received is None else received.per_layer,
    )


def print_kernel_profile(
    step: Callable[..., None], steps: int, device: torch.device, show: bool = True
) -> None:
    """`steps` more timed-path steps (graph replays included: CUPTI sees their kernels) under torch.profiler;
    with `show`, prints the GPU kernels by time per step (stderr)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if show:
        from moefleet.engine.bench.kernel_profile import kernel_table

        print(
            kernel_table(prof, steps, f"rank 0: kernels per step ({steps} profiled)"),
            file=sys.stderr,
            flush=True,
        )


GRAPH_TIMELINE_STEPS = 3  # graph replays profiled for --tbo-timeline


def graph_timeline_steps(
    run_step: Callable[[Any], None],
    batches: list[ForwardBatch],
    device: torch.device,
    barrier: Callable[[], None],
    rank: int,
    asked_comm_us: float = 0.0,
    label: str = "graph replays",
    trace_out: str = "",
) -> dict[str, Any]:
    """One graph-replayed (or eager: `label`) step per batch under the profiler (kernel_profile.step_trace), its kernels' timeline
    (trace_timeline.graph_timeline); rank 0 prints it with the emulated transfer time asked (stderr). Decode
    steps that replay a graph are what production runs; the eager timeline (`tbo_timeline_step`) is
    launch-bound."""
    from moefleet.engine import trace_timeline as tt
    from moefleet.engine.bench.kernel_profile import step_trace

    try:
        trace = step_trace(run_step, batches, device, barrier)
    except Exception as exc:  # noqa: BLE001 - no profiler here: keep the run's measurements, say why
        print(
            f"rank {rank}: graph timeline skipped: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True
        )
        return {}
    if trace_out:
        write_trace(trace, trace_out)
    events, windows = tt.kernel_events(trace), tt.step_windows(trace)
    if not windows:
        print(
            f"rank {rank}: no step windows in the trace: steps split at idle gaps",
            file=sys.stderr,
            flush=True,
        )
    timeline = tt.graph_timeline(events, windows, steps=len(batches))
    if rank == 0:
        text = tt.format_graph_timeline(timeline, asked_comm_us or None, label)
        print(f"rank 0: TBO timeline, {text}", file=sys.stderr, flush=True)
    return timeline


def write_trace(trace: dict[str, Any], path: str) -> None:
    """The Chrome trace as JSON (gzip when `path` ends in .gz): open it in Perfetto or chrome://tracing."""
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump(trace, f)


def tbo_timeline_step(
    step: Callable[..., None], device: torch.device, barrier: Callable[[], None], rank: int
) -> dict[str, Any]:
    """One eager TBO step (after an untimed one) with every stage timed on its stream: the overlap summary and
    the spans; rank 0 prints the summary, the stage table and the text timeline (stderr)."""
    from moefleet.engine import tbo_timeline as tl

    timer = tl.stage_timer(device)
    step(eager=True)  # warm-up: the eager step's kernels may not have run yet (decode steps replay graphs)
    barrier()
    _sync(device)
    step(eager=True, timer=timer)
    _sync(device)
    spans = timer.spans()
    summary = tl.overlap_summary(spans)
    if rank == 0:
        print(
            f"rank 0: TBO timeline, eager (one eager step): step {summary['step_ms']:.2f} ms, compute "
            f"busy {summary['compute_ms']:.2f} ms, comm {summary['comm_ms']:.2f} ms of which "
            f"{summary['hidden_ms']:.2f} ms ({summary['hidden_share']:.0%}) ran under the other micro-batch's "
            f"compute\n{tl.ascii_timeline(spans)}\n{tl.stage_table(spans)}",
            file=sys.stderr,
            flush=True,
        )
    return {**summary, "spans": [asdict(s) for s in spans]}


def _experts_per_gpu(model: nn.Module) -> int:
    from moefleet.engine.distributed.ep import moe_layers

    for _, layer in moe_layers(model):
        return len(layer.experts.local_experts)  # type: ignore[union-attr,arg-type]
    return 0


def install_moe_metrics(model: nn.Module, every: int) -> Any:
    """--moe-metrics-every N: the serving path's `MeteredDispatcher`s over the model's dispatchers (before
    any graph is captured, so the graphs carry their probes); None when off."""
    if not every:
        return None
    from moefleet.engine.dispatch_metrics import DispatchRecorder, install_dispatch_metrics

    recorder = DispatchRecorder(every)
    if not install_dispatch_metrics(model, recorder):
        raise ValueError(
            "--moe-metrics-every meters expert-parallel dispatchers: add --emulate-ep N or --nproc-per-node > 1"
        )
    return recorder


def summarize_moe_metrics(recorder: Any, rank: int) -> dict[str, float]:
    """The recorder's samples after the timed steps (their events have completed: the steps synced), printed
    by rank 0: sampled forwards, mean dispatch / combine seconds per MoE layer call, bytes received."""
    from moefleet.engine.dispatch_metrics import BYTES_KEY, FORWARDS_KEY, count_key, sum_key

    stats = recorder.stats()
    out = {"sampled_forwards": stats[FORWARDS_KEY], "bytes": stats[BYTES_KEY]}
    for part in ("dispatch", "combine"):
        count = stats[count_key(part)]
        out[f"{part}_samples"] = count
        out[f"{part}_mean_s"] = stats[sum_key(part)] / count if count else 0.0
    if rank == 0:
        print(
            f"rank 0: MoE metrics (one forward in {recorder.every}): {out['sampled_forwards']:.0f} sampled forwards,"
            f" dispatch {out['dispatch_mean_s'] * 1e6:.1f} us mean over {out['dispatch_samples']:.0f} calls,"
            f" combine {out['combine_mean_s'] * 1e6:.1f} us over {out['combine_samples']:.0f},"
            f" {out['bytes'] / 2**20:.1f} MiB received",
            file=sys.stderr,
            flush=True,
        )
    return out


def _capture_decode_graph(
    model: nn.Module,
    backend: Any,
    options: BenchOptions,
    scenario: Scenario,
    device: torch.device,
    group: Any,
    tbo: bool = False,
) -> tuple[CudaGraphRunner | None, str]:
    """One CUDA graph for the scenario's batch size (of the TBO step with `tbo`), as the engine captures its
    buckets, or why not. Every rank runs the same shapes in lockstep, so an EP group captures too; a step
    with a host sync (a2a) fails the capturability check on every rank alike and runs eagerly."""
    expert_parallel = group is not None and dist_world_size(group) > 1
    use, why = decide_cuda_graphs(
        options.cuda_graphs, device, backend.supports_cuda_graphs, expert_parallel, lockstep=True
    )
    if not use:
        return None, why
    runner = CudaGraphRunner(
        model,
        backend,
        max_batch_size=options.batch_size,
        max_blocks_per_seq=len(scenario.block_tables[0]),
        block_size=options.block_size,
        device=device,
        sizes=[options.batch_size],
        tbo=tbo,
    )
    try:
        with torch.inference_mode():
            runner.capture()
    except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly and say why
        release_dispatch_buffers(model)
        try:
            torch.cuda.synchronize(device)  # the broken-off step's work drains before the eager steps
        except Exception as sync_exc:  # noqa: BLE001 - a sticky CUDA error: report both
            return None, f"off: capture failed ({str(exc).splitlines()[0][:120]}); then {sync_exc}"
        return None, f"off: capture failed{' (tbo step)' if tbo else ''} ({str(exc).splitlines()[0][:160]})"
    return (
        runner,
        f"on: batch {options.batch_size}{', tbo step' if tbo else ''}, {runner.pool_bytes / 2**20:.0f} MiB",
    )


def release_dispatch_buffers(model: nn.Module) -> None:
    """After a step broke off mid-way (a failed capture check), free the dispatch workspaces it leased (symm)
    so the eager steps that follow can lease them again."""
    from moefleet.engine.distributed.ep import moe_layers

    for _, layer in moe_layers(model):
        for dispatcher in getattr(layer, "dispatchers", None) or [layer.dispatcher]:
            pool = getattr(dispatcher, "pool", None)
            if pool is not None and hasattr(pool, "release_all"):
                pool.release_all()


def dist_world_size(group: Any) -> int:
    import torch.distributed as dist

    return int(dist.get_world_size(group))
