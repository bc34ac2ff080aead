"""ModelRunner: owns the model and its paged KV cache; turns a scheduled batch into tensors, runs one forward
and samples.

Shape legend: T new tokens in the step (all sequences concatenated), B scheduled sequences, S sampling
sequences (prompt complete this step), M max blocks per sequence, V vocabulary.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch
from torch import nn

from .attention import create_attention_backend
from .config import EngineConfig
from .cuda_graph_runner import CudaGraphRunner, decide_cuda_graphs
from .forward_batch import ForwardBatch
from .kv_cache import KVCachePool
from .layers.router import prepare_gates
from .loader import dtype_from_name, load_model
from .logprobs import record_prompt, record_sampled, save_sampled
from .sampler import SamplingBatch, sample
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .structured_output import GrammarCompiler, GrammarMasks, compiler_for
from .tbo import check_supported, forward_tbo, plan_split

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs the model of one rank. `run` accepts an empty batch (an idle step that still runs the forward, so
    ranks of an expert-parallel group issue the same collectives)."""

    def __init__(
        self, config: EngineConfig, eos_token_ids: list[int] | None = None, model: nn.Module | None = None
    ):
        self.config = config
        # Only for min_tokens (EOS is banned until enough tokens were generated).
        self.eos_token_ids = list(eos_token_ids or [])
        self.device = torch.device(config.device)
        assert config.dtype is not None
        self.dtype = dtype_from_name(config.dtype)
        assert config.block_size is not None  # resolved by EngineConfig (64 for MLA on CUDA, else 16)
        self.block_size: int = config.block_size
        # Any: models follow the engine contract (forward, compute_logits), not one base class.
        self.model: Any = (
            model
            if model is not None
            else load_model(config.model, self.device, self.dtype, config.quantization)
        )
        prepare_gates(self.model)  # the sigmoid gates' bf16 GEMM, decided once the weights are in (router.py)
        self.attention_layers: list[Any] = [m for m in self.model.modules() if hasattr(m, "kv_cache_shape")]
        if not self.attention_layers:
            raise ValueError(f"model ({config.model!r}) has no attention layers with a kv_cache_shape")
        self.attn_backend = create_attention_backend(config.attention_backend, self.device, self.block_size)
        self.expert_parallel = expert_parallel = any(
            getattr(m, "ep_size", 1) > 1 for m in self.model.modules()
        )
        # Expert-parallel decode graphs need dispatchers without host syncs (symm, DeepEP low-latency).
        dispatchers = [d for m in self.model.modules() for d in getattr(m, "dispatchers", ())]
        ep_sync_free = bool(dispatchers) and all(getattr(d, "SYNC_FREE_DECODE", False) for d in dispatchers)
        # Host-side work before a captured step replays (a replay runs no Python of the step itself): each
        # distinct `graph_replay_state` once (DeepEP: the process's one buffer, cleaned after normal kernels).
        states = {id(s): s for d in dispatchers if (s := getattr(d, "graph_replay_state", None)) is not None}
        self._before_replay = [s.before_graph_replay for s in states.values()]
        # Attention variants on the torch reference path (windows, chunks, sinks) cannot be captured.
        capturable = self.attn_backend.supports_cuda_graphs and all(
            getattr(m, "supports_cuda_graphs", True) for m in self.model.modules()
        )
        self.use_cuda_graphs, why = decide_cuda_graphs(
            config.cuda_graphs, self.device, capturable, expert_parallel, ep_sync_free=ep_sync_free
        )
        self.graph_runner: CudaGraphRunner | None = None
        if config.tbo == "on":  # before a capture of the TBO decode step
            check_supported(self.model)
        self.num_kv_blocks = self._count_kv_blocks()
        self._allocate_kv_cache()
        if self.use_cuda_graphs:
            captured = self._capture_cuda_graphs()
            why = f"{captured} ({why.removeprefix('on: ')})" if captured.startswith("on") else captured
        print(f"CUDA graphs: {why}", file=sys.stderr, flush=True)
        logger.info("CUDA graphs: %s", why)
        # Unseeded requests draw from one engine-wide generator, seeded for reproducible runs.
        self._default_generator = torch.Generator(self.device).manual_seed(config.seed)
        self._generators: dict[int, torch.Generator] = {}
        # Structured outputs: per-sequence grammar matchers, the compiler built on first use.
        self.grammar = GrammarMasks(self._grammar_compiler)
        # Two-batch overlap (tbo.py): steps run as two micro-batches, and the last split's imbalance.
        self.tbo_steps_total = 0
        self.tbo_last_split_imbalance = 0.0

    # ---- KV cache ----------------------------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            math.prod(layer.kv_cache_shape(1, self.block_size)) * element_size
            for layer in self.attention_layers
        )

    def _count_kv_blocks(self) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._cuda_kv_cache_budget()
        else:
            assert config.kv_cache_bytes is not None
            budget = config.kv_cache_bytes
        num_blocks = budget // self.kv_cache_bytes_per_block()
        # More than every sequence at full length can never be used.
        num_blocks = min(num_blocks, config.max_num_seqs * config.max_blocks_per_seq)
        if num_blocks < config.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache budget holds {num_blocks} blocks, fewer than one max_model_len "
                f"({config.max_model_len}) sequence needs ({config.max_blocks_per_seq}): raise "
                "kv_cache_bytes / kv_cache_memory_fraction or lower max_model_len"
            )
        return int(num_blocks)

    def _cuda_kv_cache_budget(self) -> int:
        """Bytes for the KV cache: kv_cache_memory_fraction of the GPU is this engine's (weights + activations
        + KV, like vLLM's gpu_memory_utilization), minus what is in use now and the activation peak of the
        largest step (measured by `warmup`)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.warmup()
        activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        # Captured graphs keep a private pool about the size of the largest bucket's decode activations.
        graph_reserve = self._decode_activation_peak() if self.use_cuda_graphs else 0
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = int(total * self.config.kv_cache_memory_fraction) - used - activation_peak - graph_reserve
        logger.info(
            "GPU memory: %.2f GiB total, %.2f GiB in use, activation peak %.2f GiB, CUDA graphs %.2f GiB, "
            "KV budget %.2f GiB",
            total / 2**30,
            used / 2**30,
            activation_peak / 2**30,
            graph_reserve / 2**30,
            budget / 2**30,
        )
        return max(budget, 0)

    @torch.inference_mode()
    def _decode_activation_peak(self) -> int:
        """Peak bytes of a decode-width step at the largest graph bucket (one token per sequence), measured
        without a KV cache; reserved for the CUDA-graph memory pool before the KV cache is sized."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        caches = [layer.kv_cache for layer in self.attention_layers]
        for layer in self.attention_layers:
            layer.kv_cache = torch.empty(0, dtype=self.dtype, device=self.device)
        try:
            lens = [1] * self.config.max_num_seqs
            batch = ForwardBatch.prefill_without_cache(lens, self.device, self.attn_backend)
            self.forward_logits(batch)
        finally:
            for layer, cache in zip(self.attention_layers, caches, strict=True):
                layer.kv_cache = cache
        return torch.cuda.max_memory_allocated(self.device) - before

    def graph_runner_options(self) -> dict[str, Any]:
        """The CudaGraphRunner options of this engine's decode graphs (model, backend and keywords)."""
        config = self.config
        return {
            "model": self.model,
            "backend": self.attn_backend,
            "max_batch_size": config.max_num_seqs,
            "max_blocks_per_seq": config.max_blocks_per_seq,
            "block_size": self.block_size,
            "device": self.device,
            "tbo": config.tbo == "on",  # every step of a lone engine with --tbo on is a TBO step
        }

    def _capture_cuda_graphs(self) -> str:
        """Capture decode graphs (before the engine serves); on failure run eagerly and say why."""
        runner = CudaGraphRunner(**self.graph_runner_options())
        try:
            runner.capture()
        except RuntimeError as exc:  # e.g. a host sync in the decode step (see docs/engine.md)
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", exc)
            return f"off: capture failed ({str(exc).splitlines()[0][:200]})"
        self.graph_runner = runner
        return f"on: {len(runner.sizes)} decode buckets up to {runner.sizes[-1]}, {runner.pool_bytes / 2**20:.0f} MiB"

    @torch.inference_mode()
    def warmup(self) -> None:
        """Forward the largest step the scheduler can build: max_num_batched_tokens prompt tokens in
        max_model_len pieces, logits for max_num_seqs rows. Runs without KV cache (attention within the step).
        In an expert-parallel group every rank must call it together (the MoE layers communicate)."""
        config = self.config
        assert config.max_model_len is not None
        num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len)
        lens = [config.max_model_len] * (num_tokens // config.max_model_len)
        if num_tokens % config.max_model_len:
            lens.append(num_tokens % config.max_model_len)
        caches = [layer.kv_cache for layer in self.attention_layers]
        for layer in self.attention_layers:
            layer.kv_cache = torch.empty(0, dtype=self.dtype, device=self.device)
        try:
            batch = ForwardBatch.prefill_without_cache(lens, self.device, self.attn_backend)
            hidden = self.model(batch.input_ids, batch.positions, batch)
            rows = torch.arange(config.max_num_seqs, device=self.device) % num_tokens
            self.model.compute_logits(hidden[rows])
        finally:
            for layer, cache in zip(self.attention_layers, caches, strict=True):
                layer.kv_cache = cache

    def _allocate_kv_cache(self) -> None:
        self.kv_pool = KVCachePool(
            self.attention_layers, self.num_kv_blocks, self.block_size, self.dtype, self.device
        )
        logger.info(
            "KV cache: %d blocks x %d tokens, %.1f MiB",
            self.num_kv_blocks,
            self.block_size,
            self.num_kv_blocks * self.kv_cache_bytes_per_block() / 2**20,
        )

    # ---- one step ----------------------------------------------------------------------------------------

    def prepare(self, batch: SchedulerOutput, is_prefill: bool | None = None) -> ForwardBatch:
        """Flatten the scheduled chunks into one ForwardBatch (one host->device copy).

        `is_prefill` is the group-agreed mode of an expert-parallel step (None alone)."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_indices: list[int] = []
        for s in batch.scheduled:
            end = s.start + s.num_new_tokens
            input_ids.extend(s.seq.token_ids[s.start : end])
            positions.extend(range(s.start, end))
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                sample_indices.append(len(input_ids) - 1)
        return ForwardBatch.build(
            input_ids=input_ids,
            positions=positions,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=[s.seq.block_table for s in batch.scheduled],
            block_size=self.block_size,
            sample_indices=sample_indices,
            device=self.device,
            attn_backend=self.attn_backend,
            dp_is_prefill=is_prefill,
        )

    def forward_logits(self, fb: ForwardBatch) -> torch.Tensor:
        """Forward one batch and return float32 logits [S, V] of its sampled rows."""
        hidden = self.model(fb.input_ids, fb.positions, fb)
        return self.model.compute_logits(hidden[fb.sample_indices]).float()

    def graph_vote(self, batch: SchedulerOutput) -> bool:
        """This rank's vote on a CUDA-graph step of an expert-parallel group: it holds graphs and its batch is
        empty (it replays padding) or a decode step whose every sequence samples and fits a bucket."""
        graphs = self.graph_runner
        if graphs is None:
            return False
        if batch.is_empty:
            return graphs.can_join(0)
        decode = not batch.is_prefill and batch.num_tokens == len(batch.scheduled) == len(batch.sampling)
        return decode and graphs.can_join(batch.num_tokens)

    @torch.inference_mode()
    def run(
        self,
        batch: SchedulerOutput,
        is_prefill: bool | None = None,
        use_tbo: bool = False,
        group_tokens: int | None = None,
    ) -> list[int]:
        """One forward over `batch`; returns one sampled token per sampling sequence (scheduled order).

        `is_prefill` is the group-agreed mode (expert-parallel ranks agree on one mode per step); `use_tbo`
        (agreed by the group too) runs the forward as two interleaved micro-batches (tbo.py); `group_tokens`
        (expert-parallel groups): the step replays CUDA graphs on every rank, in the bucket of that many
        sequences (None: eager on every rank).
        """
        fb = self.prepare(batch, is_prefill)
        sampling = [s.seq for s in batch.sampling]
        grammar_mask = self.grammar.prepare(sampling, self.device)  # host fill overlaps the forward
        graphs = self.graph_runner
        if graphs is not None and self.expert_parallel:
            # the group decided (all ranks voted with graph_vote): replay together or not at all
            replay = group_tokens is not None and use_tbo == graphs.tbo
        else:
            replay = graphs is not None and use_tbo == graphs.tbo and graphs.can_run(fb)
        if replay:
            assert graphs is not None
            for hook in self._before_replay:
                hook()
            logits = graphs.replay(fb, group_tokens)  # [S, V]; decode only, so no prompt logprobs here
            if use_tbo:  # the captured TBO decode step
                self.tbo_steps_total += 1
                self.tbo_last_split_imbalance = plan_split(fb.query_lens, fb.seq_lens).imbalance
        else:
            # The MoE dispatchers read the step mode (DeepEP normal / low-latency) from fb.is_prefill.
            if use_tbo:  # eager TBO step (prefill, or no graph of the TBO decode step)
                hidden, plan = forward_tbo(self.model, fb)
                self.tbo_steps_total += 1
                self.tbo_last_split_imbalance = plan.imbalance
            else:
                hidden = self.model(fb.input_ids, fb.positions, fb)
            # Prompt logprobs of the requests that asked for them (a no-op for the rest).
            record_prompt(self.model.compute_logits, hidden, batch.scheduled)
            logits = self.model.compute_logits(hidden[fb.sample_indices])  # [S, V]
        if logits.shape[0] == 0:
            return []
        logits = logits.float()
        raw_logprobs = save_sampled(logits, sampling)  # raw distribution, before bans and grammar masks
        self._ban_early_stop_tokens(logits, sampling)
        self.grammar.apply(logits, grammar_mask)
        tokens = sample(logits, self._sampling_batch(sampling))
        self.grammar.accept(sampling, tokens)
        record_sampled(raw_logprobs, sampling, tokens)
        return tokens

    # ---- sampling state ----------------------------------------------------------------------------------

    def release(self, seq: Sequence) -> None:
        """Forget per-request state of a finished or aborted sequence."""
        self._generators.pop(seq.seq_id, None)
        self.grammar.release(seq)

    def _grammar_compiler(self) -> GrammarCompiler:
        from pathlib import Path

        from tokenizers import Tokenizer as BackendTokenizer

        path = Path(self.config.model) / "tokenizer.json"
        vocab_size = int(self.config.hf_config.get("vocab_size", 0)) or None
        backend = BackendTokenizer.from_file(str(path))
        return compiler_for(backend, vocab_size or backend.get_vocab_size(), self.eos_token_ids)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        return SamplingBatch(
            temperatures=[s.params.temperature for s in seqs],
            top_ks=[s.params.top_k for s in seqs],
            top_ps=[s.params.top_p for s in seqs],
            generators=[self._generator(s) for s in seqs],
        )

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.greedy:
            return None
        if seq.params.seed is None:
            return self._default_generator
        generator = self._generators.get(seq.seq_id)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seq.params.seed)
            self._generators[seq.seq_id] = generator
        return generator

    def _ban_early_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: EOS and stop tokens cannot be sampled before enough output tokens."""
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = list(seq.params.stop_token_ids)
                if not seq.params.ignore_eos:
                    banned.extend(self.eos_token_ids)
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[row, banned] = float("-inf")
