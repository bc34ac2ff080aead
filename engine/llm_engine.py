"""LLMEngine: the step loop (schedule -> run -> postprocess), and LLM, the offline batch API on top of it.

Not thread-safe: one thread owns an engine (the HTTP server drives it from `server/async_engine.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .logprobs import attach as attach_logprobs
from .model_runner import ModelRunner
from .sampling_params import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .tbo import wants_tbo
from .tokenizer import Tokenizer

# This rank's scheduled batch -> (run the forward?, prefill mode?[, two-batch overlap?]), identical decisions
# on every rank (a 2-tuple: no TBO).
StepAgreement = Callable[[SchedulerOutput], tuple[bool, ...]]


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    """Continuous-batching engine of one rank: add requests, call `step()` until none are unfinished."""

    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module | None = None,
        step_agreement: StepAgreement | None = None,
    ):
        """`model` replaces loading one from config.model. `step_agreement` (expert-parallel groups) decides,
        from this rank's batch, whether to run the forward and in which mode; see `agree_step`."""
        self.config = config
        self.step_agreement = step_agreement
        self.tokenizer = Tokenizer(config.model)
        self.model_runner = ModelRunner(config, self.tokenizer.eos_token_ids, model)
        assert config.max_model_len is not None
        self.scheduler = Scheduler(
            BlockManager(self.model_runner.num_kv_blocks, self.model_runner.block_size),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
        )
        self.vocab_size = int(config.hf_config.get("vocab_size", self.tokenizer.vocab_size))
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestOutput] = []
        self._kv_senders: set[str] = set()  # requests added with kv_mode="send"
        self._kv_parked: list[Sequence] = []  # parked for sending this step, until `take_kv_sends`
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps_total = 0

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        kv_mode: str | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (saying what to change) for requests that cannot run.

        `kv_mode` (disaggregation, engine/disaggregation/roles.py): "send" computes the prompt and the first
        token, then parks the request (`take_kv_sends`) until `kv_sent`; "receive" reserves blocks for the
        prompt's KV and parks the request until `kv_landed`."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if request_id in self._requests or any(o.request_id == request_id for o in self._aborted):
            raise ValueError(f"request_id ({request_id!r}) is already in use: pick a unique id")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt_token_ids has ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}; "
                "tokenize with this model's tokenizer"
            )
        seq = Sequence(request_id, prompt_token_ids, params)
        if kv_mode == "receive":
            self.scheduler.reserve_for_kv(seq)
        else:
            self.scheduler.add(seq)
            if kv_mode == "send":
                self._kv_senders.add(request_id)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.token_ids, params, self.tokenizer.eos_token_ids
        )
        self._requests[request_id] = _Request(seq, detokenizer)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now; the next `step()` reports it finished with "abort".
        Returns False for an unknown (or already finished) request."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self._kv_senders.discard(request_id)
        self.scheduler.abort(request_id)
        self.model_runner.release(request.seq)
        self._aborted.append(self._output(request.seq, [], "", "abort"))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        """Schedule one batch, run the model on it, and report every request that produced something."""
        outputs, self._aborted = self._aborted, []
        batch = self.scheduler.schedule()
        run, is_prefill, use_tbo, graph_tokens = self.agree_step(batch)
        if run:
            token_ids = self.model_runner.run(
                batch, is_prefill=is_prefill, use_tbo=use_tbo, group_tokens=graph_tokens
            )
            outputs += self.postprocess(batch, token_ids)
        return outputs

    def agree_step(self, batch: SchedulerOutput) -> tuple[bool, bool, bool, int | None]:
        """(run the forward?, prefill mode?, two-batch overlap?, group graph tokens). Alone: run when there is
        work, in the batch's own mode, TBO as `config.tbo` says, graphs as the runner decides. In an
        expert-parallel group every rank must run each step in one agreed mode, an empty batch included (an idle
        forward with T = 0), and replay CUDA graphs together (the bucket of the group's most sequences), so the
        group's `step_agreement` decides."""
        if self.step_agreement is not None:
            run, is_prefill, *rest = self.step_agreement(batch)
            use_tbo = bool(rest and rest[0])
            graph_tokens = rest[1] if len(rest) > 1 else None
            return run, is_prefill, use_tbo, graph_tokens
        tbo_here = wants_tbo(self.config.tbo, batch.num_tokens, batch.is_prefill)
        return not batch.is_empty, batch.is_prefill, tbo_here, None

    def postprocess(self, batch: SchedulerOutput, token_ids: list[int]) -> list[RequestOutput]:
        """Record the computed tokens, append sampled ones, detokenize, and retire finished requests."""
        self.scheduler.advance(batch)
        self.num_steps_total += 1
        self.prompt_tokens_total += sum(
            min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens) - min(s.start, s.seq.num_prompt_tokens)
            for s in batch.scheduled
        )
        outputs = []
        for scheduled, token_id in zip(batch.sampling, token_ids, strict=True):
            seq = scheduled.seq
            seq.append_token(token_id)
            self.generation_tokens_total += 1
            if seq.request_id in self._kv_senders:  # prefill role: ship the KV, the output waits for the ack
                self._kv_senders.discard(seq.request_id)
                self.scheduler.park_sending(seq)
                self._kv_parked.append(seq)
                continue
            delta, finish_reason, stop_reason = self._requests[seq.request_id].detokenizer.update(token_id)
            if finish_reason is not None:
                seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
                self.scheduler.finish(seq)
                self.model_runner.release(seq)
                del self._requests[seq.request_id]
            outputs.append(
                attach_logprobs(self._output(seq, [token_id], delta, finish_reason, stop_reason), seq)
            )
        return outputs

    # ---- disaggregation (driven by engine/disaggregation/roles.py) ---------------------------------------

    def has_runnable_requests(self) -> bool:
        """Work for `step()`: unfinished requests other than those parked while their KV moves."""
        sched = self.scheduler
        parked = len(sched.waiting_for_kv) + len(sched.sending_kv)
        return bool(self._aborted) or len(self._requests) > parked

    def take_kv_sends(self) -> list[Sequence]:
        """Prefill side: sequences parked since the last call (prompt computed, first token sampled)."""
        parked, self._kv_parked = self._kv_parked, []
        return parked

    def kv_sent(self, request_id: str) -> RequestOutput:
        """Prefill side: the decode side acknowledged the KV; free the blocks and report the first token."""
        request = self._requests.pop(request_id)
        seq = request.seq
        token_id = seq.token_ids[-1]
        delta, finish_reason, stop_reason = request.detokenizer.update(token_id)
        seq.finish_reason, seq.stop_reason = finish_reason or "length", stop_reason
        self.scheduler.finish_sent(seq)
        self.model_runner.release(seq)
        return attach_logprobs(self._output(seq, [token_id], delta, seq.finish_reason, stop_reason), seq)

    def kv_blocks(self, request_id: str) -> list[int]:
        """The blocks a parked request holds (decode: reserved for its prompt; prefill: to send)."""
        return list(self._requests[request_id].seq.block_table)

    def kv_landed(
        self, request_id: str, first_token: int, first_logprob: TokenLogprob | None = None
    ) -> RequestOutput:
        """Decode side: the prompt's KV and the first token arrived (with its logprob entry when the request
        asked for logprobs, computed by the prefill side); report the token and decode from here."""
        request = self._requests[request_id]
        seq = request.seq
        if seq.params.logprobs is not None and (
            first_logprob is None or first_logprob.token_id != first_token
        ):
            raise ValueError(f"the prefill side sent no logprobs for the first token of {request_id}")
        self.scheduler.resume_with_kv(seq)
        seq.append_token(first_token)
        if seq.params.logprobs is not None:
            seq.new_logprob = first_logprob
        self.generation_tokens_total += 1
        delta, finish_reason, stop_reason = request.detokenizer.update(first_token)
        if finish_reason is not None:
            seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
            self.scheduler.finish(seq)
            self.model_runner.release(seq)
            del self._requests[request_id]
        return attach_logprobs(self._output(seq, [first_token], delta, finish_reason, stop_reason), seq)

    def stats(self) -> dict[str, float]:
        """Load and KV usage of this engine, for metrics and routing."""
        bm = self.scheduler.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_waiting_for_kv": len(self.scheduler.waiting_for_kv),
            "num_sending_kv": len(self.scheduler.sending_kv),
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_total": bm.num_blocks,
            "kv_usage": bm.usage,
            "num_preemptions_total": self.scheduler.num_preemptions_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "tbo_steps_total": self.model_runner.tbo_steps_total,
            "tbo_last_split_imbalance": self.model_runner.tbo_last_split_imbalance,
        }

    @staticmethod
    def _output(
        seq: Sequence,
        token_ids: list[int],
        delta: str,
        finish_reason: FinishReason | None,
        stop_reason: str | int | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            text_delta=delta,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            stop_reason=stop_reason,
        )


@dataclass(slots=True)
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None
    # One entry per new token when the request asked for logprobs (SamplingParams.logprobs).
    logprobs: list[TokenLogprob] | None = None


class LLM:
    """Offline batch generation: `LLM(model_dir, **config).generate(prompts, sampling_params)`."""

    def __init__(self, model: str, **config: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._request_counter = itertools.count()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Generate for all prompts together (continuous batching); results come back in input order.
        Text prompts are tokenized with special tokens (BOS where the model wants one)."""
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts: "
                    "pass one per prompt or a single SamplingParams"
                )
            params_list = sampling_params
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        ids = [f"generate-{next(self._request_counter)}" for _ in prompts]
        results: dict[str, GenerationResult] = {}
        try:
            for request_id, tokens, params in zip(ids, prompt_ids, params_list, strict=True):
                self.engine.add_request(request_id, tokens, params)
                results[request_id] = GenerationResult(tokens, [], "", None)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    result = results.get(out.request_id)
                    if result is None:
                        continue  # e.g. the abort notice of an earlier, interrupted call
                    result.token_ids.extend(out.new_token_ids)
                    result.text += out.text_delta
                    if out.logprobs is not None:
                        result.logprobs = (result.logprobs or []) + list(out.logprobs)
                    if out.finished:
                        result.finish_reason, result.stop_reason = out.finish_reason, out.stop_reason
        except BaseException:
            for request_id in results:
                self.engine.abort_request(request_id)
            raise
        return [results[i] for i in ids]
