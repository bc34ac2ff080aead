"""Wire DP attention + expert parallelism into the single-rank engine, from the outside.

    state = init_distributed(Topology.from_env(), device, hf_config=config.hf_config)
    engine = build_engine(config, state, backend="auto")        # every rank
    loop = DPEngineLoop(engine, RequestRouter(state.cpu_group))  # every rank
    while loop.step(): ...                                        # front end: loop.router.submit(...)

`build_engine` publishes the topology (`topology.set_current`) before the model is built (so each rank allocates and loads only its
expert block), installs dispatchers on the MoE layers, and gives the engine a step agreement that runs the
DP all-gather each step (idle ranks run a T = 0 forward; prefill mode if any rank prefills).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moefleet.engine import topology
from moefleet.engine.config import EngineConfig
from moefleet.engine.dispatch_metrics import (
    DispatchRecorder,
    every_from_env,
    install_dispatch_metrics,
    paused,
)
from moefleet.engine.distributed.dp import DPStepCoordinator, StepInfo
from moefleet.engine.distributed.ep import apply_expert_parallel, has_fp8_experts
from moefleet.engine.distributed.groups import ProcessGroups
from moefleet.engine.distributed.request_router import (
    AbortRequest,
    AddRequest,
    GroupCommand,
    RequestRouter,
    Shutdown,
)
from moefleet.engine.eplb.config import EPLBConfig
from moefleet.engine.eplb.expert_location import check_model_expert_slots
from moefleet.engine.llm_engine import LLMEngine
from moefleet.engine.loader import load_model
from moefleet.engine.scheduler import SchedulerOutput
from moefleet.engine.tbo import num_micro_batches, wants_tbo


def make_step_agreement(
    coordinator: DPStepCoordinator,
    tbo: str = "off",
    graph_vote: Callable[[SchedulerOutput], bool] | None = None,
) -> Callable[[SchedulerOutput], tuple[bool, bool, bool, int | None]]:
    """LLMEngine's `step_agreement`: all-gather this rank's batch summary, return (run, prefill mode, TBO,
    graph tokens); TBO only when every rank with work can use it (`tbo` is the `--tbo` mode, tbo.py); a CUDA
    graph step only when every rank's `graph_vote` (ModelRunner.graph_vote) says yes, then graph tokens = the
    most sequences any rank decodes (every rank replays that bucket), else None."""

    def agree(batch: SchedulerOutput) -> tuple[bool, bool, bool, int | None]:
        can_tbo = not batch.is_empty and wants_tbo(tbo, batch.num_tokens, batch.is_prefill)
        info = StepInfo(
            num_tokens=batch.num_tokens,
            is_prefill=batch.is_prefill,
            has_work=not batch.is_empty,
            can_use_tbo=can_tbo,
            can_use_graph=graph_vote is not None and graph_vote(batch),
        )
        step = coordinator.sync(info)
        return step.run, step.is_prefill, step.use_tbo, step.max_tokens if step.use_graph else None

    return agree


def build_engine(
    config: EngineConfig,
    state: ProcessGroups,
    backend: str = "auto",
    eplb: EPLBConfig | None = None,
    metrics_every: int | None = None,
    **options: Any,
) -> LLMEngine:
    """This rank's engine: local expert slots only, EP dispatchers installed, DP step agreement set; with an
    active `eplb`, an `EPLBController` as `engine.eplb` (load recorder, rebalances). Every MoE dispatcher is
    wrapped in a `MeteredDispatcher` sampling one forward in `metrics_every` (default: MOEFLEET_MOE_METRICS_EVERY
    or 16; 0 = off; CUDA-graph decode replays included), its `DispatchRecorder` as `engine.dispatch_metrics`
    (dispatch_metrics.py)."""
    eplb = eplb or EPLBConfig()
    check_model_expert_slots(config.hf_config, state.world_size, eplb.num_redundant_experts)
    # The launch's topology, with EPLB's redundant slots, is what the model is built for.
    topology.set_current(
        dataclasses.replace(state.topology, num_redundant_experts=eplb.num_redundant_experts)
    )
    assert config.dtype is not None
    model = load_model(config.model, state.device, config.dtype, config.quantization)
    hidden_size = int(config.hf_config.get("hidden_size", 0))
    apply_expert_parallel(
        model,
        state.device_group,
        backend,
        num_micro_batches=num_micro_batches(config.tbo),
        hidden_size=hidden_size,
        device_type=state.device.type,
        max_tokens_per_rank=config.max_num_batched_tokens,  # the most tokens one rank forwards in a step
        top_k=int(config.hf_config.get("num_experts_per_tok") or 0),
        dtype=config.dtype,
        device=state.device,
        micro_batches=num_micro_batches(config.tbo),
        deepep_ll_fp8=has_fp8_experts(model),
        max_decode_tokens=config.max_num_seqs,  # decode steps forward at most this many tokens per rank
        **options,
    )
    every = every_from_env() if metrics_every is None else metrics_every
    # Per-rank dispatch/combine time and bytes, sampled; exported by the front end's /metrics. Installed before
    # the engine is built: its CUDA graphs (captured while it is built) then carry the metered dispatchers'
    # probes, so graph-replayed decode steps are sampled too.
    recorder = DispatchRecorder(every) if every else None
    if recorder is not None:
        install_dispatch_metrics(model, recorder)
    runners: list[Any] = []  # the engine's ModelRunner once built (it captures graphs while it is built)
    agreement = make_step_agreement(
        DPStepCoordinator(state.cpu_group),
        config.tbo,
        graph_vote=lambda batch: bool(runners) and runners[0].graph_vote(batch),
    )
    with paused(recorder):  # warm-ups and capture: not samples
        engine = LLMEngine(config, model=model, step_agreement=agreement)
    runners.append(engine.model_runner)
    if recorder is not None:
        engine.dispatch_metrics = recorder  # type: ignore[attr-defined]
    if eplb.active:
        from moefleet.engine.eplb import controller

        engine.eplb = controller.EPLBController(  # type: ignore[attr-defined]
            model,
            eplb,
            state.rank,
            state.world_size,
            state.device_group,
            num_nodes=state.topology.nnodes,
            num_groups=int(config.hf_config.get("n_group") or 1),
        )
        controller.set_current(engine.eplb)  # type: ignore[attr-defined]
    return engine


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Travels back with the outputs when a rank's engine refused a request at admission."""

    request_id: str
    message: str
    finished: bool = True
    no_room: bool = False  # a valid request refused for want of KV room now (503 kv_cache_full, not 400)


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Travels back with the outputs when a request failed on its rank after admission (e.g. its KV transfer
    failed): the front end ends its stream with a server error."""

    request_id: str
    message: str
    finished: bool = True


class DPEngineLoop:
    """One rank's serving loop: request hand-over, then one engine step. Call `step()` on every rank until it
    returns False (the front end submitted `Shutdown`).

    On the front end, `on_outputs(outputs)` receives every rank's RequestOutputs (to stream to clients) and
    `RequestRejected` for requests a rank's engine refused;
    when the whole group is idle it waits up to `idle_wait_s` for new requests before exchanging again.
    """

    def __init__(
        self,
        engine: LLMEngine,
        router: RequestRouter,
        on_outputs: Callable[[list[Any]], None] | None = None,
        idle_wait_s: float = 0.05,
    ):
        self.engine, self.router, self.on_outputs, self.idle_wait_s = engine, router, on_outputs, idle_wait_s
        self._pending: list[Any] = []
        self._group_idle = False
        # Prefill/decode roles (optional, engine/disaggregation/group_roles.py): requests whose payload carries
        # a transfer go to `pd.add`, its aborts to `pd.abort`; `pd.poll()` (ended transfers, as outputs) runs
        # before each engine step and `pd.after_step()` after it.
        self.pd: Any = None
        # EPLB (optional): commands enter on the front end and run on every rank at a step boundary.
        self.eplb: Any = getattr(engine, "eplb", None)
        self.dispatch_metrics: Any = getattr(engine, "dispatch_metrics", None)
        if self.eplb is not None and router.is_front_end:
            self.eplb.bind(lambda command: router.submit(GroupCommand(command)))

    def load(self, stats: dict[str, float] | None = None) -> int:
        stats = self.engine.stats() if stats is None else stats
        return int(stats["num_running"] + stats["num_waiting"])

    def _deliver(self, rank: int, outputs: list[Any]) -> None:
        for out in outputs:
            if out.finished:
                self.router.finished(out.request_id)
        if self.on_outputs is not None and outputs:
            self.on_outputs(outputs)

    def step(self) -> bool:
        if self.router.is_front_end and self._group_idle:
            self.router.wait_for_inbox(self.idle_wait_s)
        stats = self.engine.stats()  # travels to the front end: its /metrics describes the whole group
        if self.dispatch_metrics is not None:
            stats.update(self.dispatch_metrics.stats())
        messages = self.router.exchange(self.load(stats), self._pending, self._deliver, stats)
        running = True
        rejected: list[Any] = []
        commands = [m.payload for m in messages if isinstance(m, GroupCommand)]
        if self.eplb is not None:  # a boundary every rank reaches together: between two forwards
            self.eplb.on_step_boundary(commands, self.engine.num_steps_total)
        for message in messages:
            if isinstance(message, AddRequest):
                prompt_token_ids, sampling_params, *transfer = message.payload
                if transfer and self.pd is not None:
                    rejected += self.pd.add(
                        message.request_id, prompt_token_ids, sampling_params, transfer[0]
                    )
                    continue
                try:
                    self.engine.add_request(message.request_id, prompt_token_ids, sampling_params)
                except (ValueError, TypeError) as exc:  # a bad request must not take the rank down
                    rejected.append(RequestRejected(message.request_id, str(exc)))
            elif isinstance(message, AbortRequest):
                if self.pd is None or not self.pd.abort(message.request_id):
                    self.engine.abort_request(message.request_id)
            elif isinstance(message, Shutdown):
                running = False
        if not running:
            return False
        if self.pd is not None:
            rejected += self.pd.poll()
        batch_before = self.engine.num_steps_total
        self._pending = rejected + self.engine.step()
        if self.pd is not None:
            self.pd.after_step()
        # The group ran no forward at all when nobody had work (step agreement said run=False).
        self._group_idle = self.engine.num_steps_total == batch_before and not self._pending
        return True
