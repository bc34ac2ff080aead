"""CUDA graphs for decode steps: capture one graph per batch-size bucket, replay with static inputs.

A decode step (every sequence computes one token) of n sequences runs in the graph of the smallest bucket
>= n: the live ForwardBatch is copied into the graph's static buffers (`fill_static`), rows n..bucket are
padding (token 0 at position 0, KV slot -1 so nothing is written, seq_len 1 over page 0, so every kernel
reads valid memory and produces finite values that are dropped), then the graph replays and the first n
rows of its logits are the step's logits. Graphs share one memory pool, captured largest first.

The pure parts (bucket sizes, bucket choice, the static fill) run and are tested on CPU; capture/replay
need CUDA (tests/gpu/test_cuda_graphs.py). Whether graphs are used at all is `decide_cuda_graphs`, also
pure. With `tbo=True` the captured step is the two-batch-overlap decode step (tbo.forward_tbo: the split is
views of the static buffers, the comm stream forks from and joins the capture stream); a dispatcher with a
host sync (a2a's receive counts) fails `check_capturable` and the caller runs eagerly with the reason.
MoE dispatch metrics (dispatch_metrics.py; installed before capture): each graph is captured with its own
`GraphProbe` (timing events and a byte count recorded inside the graph), `replay` settles and arms it around
each launch, and the warm-up forwards of `capture` are not samples. Shape legend: n live sequences, N bucket
size, M max blocks per sequence, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .dispatch_metrics import DispatchRecorder, GraphProbe, paused, recorder_of
from .forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_batch_size: int, extra: Iterable[int] = ()) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 16 up to 256, every 32 beyond, capped at (and including)
    max_batch_size; `extra` adds sizes a data-parallel group pads to. Sorted ascending, unique."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size ({max_batch_size}) must be >= 1")
    sizes = {1, 2, 4, 8, *range(16, 257, 16), *range(288, max_batch_size + 1, 32), max_batch_size}
    sizes |= {int(e) for e in extra if 1 <= int(e) <= max_batch_size}
    return sorted(s for s in sizes if s <= max_batch_size)


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size >= num_seqs (None: too large for any graph, run eagerly)."""
    for size in sizes:
        if size >= num_seqs:
            return size
    return None


# Expert-parallel decode graphs (every rank replays the group-agreed bucket; idle ranks replay padding) are
# captured by `--cuda-graphs auto` only once tests/gpu/test_ep_backends_gpu.py's serve-level graph test has
# passed on 2 GPUs; until then `--cuda-graphs on` opts in (docs/distributed.md, "CUDA graphs of EP decode").
EP_GRAPHS_VERIFIED = False


def decide_cuda_graphs(
    mode: str,
    device: torch.device,
    backend_supports_graphs: bool,
    expert_parallel: bool,
    lockstep: bool = False,
    ep_sync_free: bool = False,
    ep_verified: bool | None = None,
) -> tuple[bool, str]:
    """(use graphs?, why) for `--cuda-graphs mode`. auto = on for CUDA decode with a graph-capable attention
    backend on a single rank; in an expert-parallel group only when every rank replays the same graph together
    (`lockstep`: the bench, where every rank runs the same shapes) or the engine agrees a bucket per step, which
    needs MoE dispatchers without host syncs (`ep_sync_free`: symm, deepep) and, for auto, the 2-GPU
    verification (`EP_GRAPHS_VERIFIED`); `on` = auto without that last condition; `off` always off."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs ({mode!r}) must be 'auto', 'on' or 'off'")
    if mode == "off":
        return False, "off: requested"
    if device.type != "cuda":
        return False, "off: not a CUDA device"
    if not backend_supports_graphs:
        return False, "off: the attention backend cannot be captured (use --attention-backend triton)"
    if expert_parallel and not lockstep:
        if not ep_sync_free:
            return False, (
                "off: the MoE backend reads receive counts on the host (a2a), which a graph cannot replay: "
                "use --moe-backend symm or deepep"
            )
        verified = EP_GRAPHS_VERIFIED if ep_verified is None else ep_verified
        if mode == "auto" and not verified:
            return False, (
                "off: expert-parallel decode graphs are not verified on GPUs yet (--cuda-graphs on opts in)"
            )
        return (
            True,
            "on: expert-parallel decode, one group-agreed bucket per step (idle ranks replay padding)",
        )
    return True, "on: CUDA decode with a graph-capable attention backend"


@dataclass
class StaticInputs:
    """Preallocated device inputs of the captured decode graphs (views [:N] serve bucket N)."""

    input_ids: torch.Tensor  # [max N] int64
    positions: torch.Tensor  # [max N] int64
    slot_mapping: torch.Tensor  # [max N] int64
    seq_lens: torch.Tensor  # [max N] int32
    query_lens: torch.Tensor  # [max N] int32, all ones
    cu_query_lens: torch.Tensor  # [max N + 1] int32, 0..max N
    block_tables: torch.Tensor  # [max N, M] int32
    sample_indices: torch.Tensor  # [max N] int64, 0..max N - 1

    @classmethod
    def allocate(cls, max_batch_size: int, max_blocks_per_seq: int, device: torch.device) -> StaticInputs:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        static = cls(
            input_ids=zeros(max_batch_size),
            positions=zeros(max_batch_size),
            slot_mapping=torch.full((max_batch_size,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.ones(max_batch_size, dtype=torch.int32, device=device),
            query_lens=torch.ones(max_batch_size, dtype=torch.int32, device=device),
            cu_query_lens=torch.arange(max_batch_size + 1, dtype=torch.int32, device=device),
            block_tables=zeros(max_batch_size, max_blocks_per_seq, dtype=torch.int32),
            sample_indices=torch.arange(max_batch_size, dtype=torch.int64, device=device),
        )
        return static

    @property
    def max_batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.block_tables.shape[1])


def fill_static(static: StaticInputs, batch: ForwardBatch, bucket: int) -> None:
    """Copy a live decode batch of n sequences into the static buffers of `bucket` (>= n), padding rows
    n..bucket (device-to-device copies and fills only: no host sync). An empty batch (an idle rank of an
    expert-parallel group replaying the group's bucket) pads every row."""
    n = batch.num_seqs
    if batch.num_tokens == 0:
        _pad(static, 0, bucket)
        return
    width = int(batch.block_tables.shape[1])
    if batch.mode is not ForwardMode.DECODE or batch.num_tokens != n:
        raise ValueError(f"only decode steps run in CUDA graphs (got a {batch.mode.value} step)")
    if not n <= bucket <= static.max_batch_size or width > static.max_blocks_per_seq:
        raise ValueError(
            f"a batch of {n} sequences x {width} blocks does not fit bucket {bucket} of static buffers "
            f"[{static.max_batch_size}, {static.max_blocks_per_seq}]"
        )
    static.input_ids[:n].copy_(batch.input_ids)
    static.positions[:n].copy_(batch.positions)
    static.slot_mapping[:n].copy_(batch.slot_mapping)
    static.seq_lens[:n].copy_(batch.seq_lens_t)
    # Columns past `width` keep stale page ids: the kernels read only pages below each seq_len.
    static.block_tables[:n, :width].copy_(batch.block_tables)
    _pad(static, n, bucket)


def _pad(static: StaticInputs, start: int, bucket: int) -> None:
    """Rows start..bucket: token 0 at position 0, no KV slot, seq_len 1 over page 0."""
    static.input_ids[start:bucket].zero_()
    static.positions[start:bucket].zero_()
    static.slot_mapping[start:bucket].fill_(-1)
    static.seq_lens[start:bucket].fill_(1)
    static.block_tables[start:bucket, 0].zero_()


def static_batch(static: StaticInputs, bucket: int, block_size: int, backend: Any) -> ForwardBatch:
    """The ForwardBatch a graph of `bucket` rows is captured with: views of the static buffers. Its host
    lists are placeholders (seq_lens 1): graph-safe kernels size launches from tensor shapes only."""
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        block_size=block_size,
        query_lens=[1] * bucket,
        seq_lens=[1] * bucket,
        input_ids=static.input_ids[:bucket],
        positions=static.positions[:bucket],
        slot_mapping=static.slot_mapping[:bucket],
        query_lens_t=static.query_lens[:bucket],
        seq_lens_t=static.seq_lens[:bucket],
        cu_query_lens=static.cu_query_lens[: bucket + 1],
        block_tables=static.block_tables[:bucket],
        sample_indices=static.sample_indices[:bucket],
        block_tables_cpu=torch.zeros(bucket, 1, dtype=torch.int64),
        attn_backend=backend,
        for_cuda_graph=True,
    )


class CudaGraphRunner:
    """Captures `model` decode steps per bucket and replays them. `forward(model, batch) -> logits [n, V]`
    is the eager step being captured (ModelRunner.forward_logits)."""

    def __init__(
        self,
        model: Any,
        backend: Any,
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        extra_sizes: Iterable[int] = (),
        sizes: list[int] | None = None,
        tbo: bool = False,
    ):
        """`sizes` replaces the default buckets (e.g. one size for a benchmark); `tbo` captures the
        two-batch-overlap step (tbo.forward_tbo) instead of the plain forward."""
        self.model, self.backend, self.block_size, self.device = model, backend, block_size, device
        self.tbo = tbo
        self.sizes = sorted(sizes) if sizes else capture_batch_sizes(max_batch_size, extra_sizes)
        if self.sizes[-1] > max_batch_size:
            raise ValueError(f"capture sizes {self.sizes} exceed max_batch_size ({max_batch_size})")
        self.static = StaticInputs.allocate(max_batch_size, max_blocks_per_seq, device)
        self.graphs: dict[int, Any] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> static logits [N, V]
        # bucket -> the MoE dispatch metrics' probe captured in its graph (dispatch_metrics.py; none: off)
        self.probes: dict[int, GraphProbe] = {}
        self.pool_bytes = 0

    def _step(self, batch: ForwardBatch) -> torch.Tensor:
        if self.tbo:
            from .tbo import forward_tbo

            hidden, _ = forward_tbo(self.model, batch)
        else:
            hidden = self.model(batch.input_ids, batch.positions, batch)
        return self.model.compute_logits(hidden).float()  # decode: every row samples

    def check_capturable(self) -> None:
        """One eager padded step with CUDA's sync debug mode set to error: any host synchronisation in the
        decode step (e.g. `.tolist()` in an MoE dispatcher) raises here, before a capture could fail."""
        batch = static_batch(self.static, self.sizes[-1], self.block_size, self.backend)
        torch.cuda.synchronize(self.device)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._step(batch)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def capture(self) -> None:
        recorder = recorder_of(self.model)  # MoE dispatch metrics (None: off): a probe per graph
        try:
            self._capture(recorder)
        except BaseException:
            if recorder is not None:
                recorder.forget(self.probes.values())
            self.probes.clear()
            raise

    def _capture(self, recorder: DispatchRecorder | None) -> None:
        self.backend.init_cuda_graph_state(
            self.static.max_batch_size, self.static.max_blocks_per_seq, self.device
        )
        with paused(recorder):  # warm-up forwards are not dispatch-metric samples
            self.check_capturable()
        # torch.cuda.graph() empties the allocator's cache on entry, so a baseline taken with cached blocks in
        # it (e.g. FP8 weight conversion temporaries) made the pool size negative (-37,702 MiB measured on
        # H200); empty it on both sides: what stays reserved after is the graphs' private pool
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        pool = None
        stream = torch.cuda.Stream(self.device)
        for bucket in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), paused(recorder):
                for _ in range(2):  # compile Triton kernels, settle the allocator
                    self._step(static_batch(self.static, bucket, self.block_size, self.backend))
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            # A fresh batch: its per-step memo (rotary cos/sin, backend metadata) must be computed inside
            # the capture from the static buffers, never reused from the warm-up runs.
            batch = static_batch(self.static, bucket, self.block_size, self.backend)
            self.backend.init_forward_metadata_capture(batch)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                with _probe(recorder) as probe:  # dispatch metrics: recorded inside this graph
                    self.outputs[bucket] = self._step(batch)
            if probe is not None:
                self.probes[bucket] = probe
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.pool_bytes = max(0, torch.cuda.memory_reserved(self.device) - before)
        logger.info(
            "CUDA graphs: captured %d decode buckets (%s), %.1f MiB",
            len(self.sizes),
            ", ".join(map(str, self.sizes)),
            self.pool_bytes / 2**20,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.mode is ForwardMode.DECODE
            and bool(self.graphs)
            and bucket_for(batch.num_seqs, self.sizes) is not None
            and int(batch.block_tables.shape[1]) <= self.static.max_blocks_per_seq
            and int(batch.sample_indices.shape[0]) == batch.num_seqs
        )

    def can_join(self, num_seqs: int) -> bool:
        """This rank's vote in an expert-parallel group: its decode batch of num_seqs (0: idle) fits a bucket."""
        return bool(self.graphs) and bucket_for(num_seqs, self.sizes) is not None

    def replay(self, batch: ForwardBatch, group_tokens: int | None = None) -> torch.Tensor:
        """Logits [n, V] of a decode batch (a view of the graph's output: read it before the next replay).
        `group_tokens`: the most sequences any rank of an expert-parallel group decodes this step; every rank
        replays that bucket (an idle rank, n = 0, replays padding) so the captured collectives line up."""
        bucket = bucket_for(max(batch.num_seqs, group_tokens or 0), self.sizes)
        assert bucket is not None
        fill_static(self.static, batch, bucket)
        self.backend.init_forward_metadata_replay(
            static_batch(self.static, bucket, self.block_size, self.backend)
        )
        probe = self.probes.get(bucket)
        if probe is not None:  # dispatch metrics: settle this graph's armed sample before re-recording it
            probe.before_replay()
        self.graphs[bucket].replay()
        if probe is not None:  # counts the forward; a sampled one arms the probe (no host sync)
            probe.after_replay()
        return self.outputs[bucket][: batch.num_seqs]


def _probe(recorder: DispatchRecorder | None) -> AbstractContextManager[GraphProbe | None]:
    return recorder.capture() if recorder is not None else nullcontext()
