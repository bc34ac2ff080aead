"""One rank of a multi-process test group, started by tests/distributed/conftest.py as a subprocess.

Usage: worker.py SCENARIO OUT_DIR. The launch contract comes from the environment exactly as in a pod
(MOEFLEET_NNODES, MOEFLEET_NODE_RANK, MOEFLEET_NPROC_PER_NODE, MOEFLEET_LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). Results go to OUT_DIR/rank{r}.pt; the test process computes references and asserts.
This file is also imported by the tests (for the shared input generators and the toy MoE model).
Shape legend: T tokens, D hidden, K top-k, E experts, L local experts, I expert intermediate size.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from moefleet.engine import topology
from moefleet.engine.distributed import ep, groups
from moefleet.engine.distributed.a2a import AllToAllDispatcher
from moefleet.engine.distributed.dp import DPStepCoordinator, StepInfo
from moefleet.engine.distributed.request_router import AbortRequest, AddRequest, RequestRouter
from moefleet.engine.distributed.watchdog import Watchdog, guard
from moefleet.engine.topology import Topology
from torch import nn

HIDDEN = 8
NUM_EXPERTS = 8
TOP_K = 3


# ---- inputs shared by workers and tests -------------------------------------------------------------
def dispatch_cases(world_size: int) -> list[dict[str, Any]]:
    """Routing cases: uniform, skewed onto two experts, some ranks with 0 tokens, padding ids (-1)."""
    cases = []
    for seed, kind in enumerate(("uniform", "skewed", "idle_ranks", "padding", "all_idle_but_one")):
        g = torch.Generator().manual_seed(1000 + seed)
        tokens = torch.randint(0, 7, (world_size,), generator=g)
        if kind == "idle_ranks":
            tokens[1::2] = 0
        if kind == "all_idle_but_one":
            tokens[:] = 0
            tokens[-1] = 5
        total = int(tokens.sum())
        hidden = torch.randn(total, HIDDEN, generator=g)
        scores = torch.rand(total, NUM_EXPERTS, generator=g)
        if kind == "skewed":
            scores[:, :2] += 10.0  # experts 0 and 1 (rank 0) get nearly every token
        topk_ids = scores.topk(TOP_K, dim=1).indices
        if kind == "padding":
            topk_ids[torch.rand(total, TOP_K, generator=g) < 0.3] = -1
        weights = torch.rand(total, TOP_K, generator=g)
        cases.append(
            {"kind": kind, "tokens": tokens.tolist(), "hidden": hidden, "ids": topk_ids, "w": weights}
        )
    return cases


def expert_fn(rows: torch.Tensor, global_expert: int) -> torch.Tensor:
    """Stand-in expert whose output depends on which expert ran it."""
    return rows * (global_expert + 1) + 0.5 * global_expert


def run_experts(rows: torch.Tensor, tokens_per_expert: list[int], first_expert: int) -> torch.Tensor:
    out = torch.empty_like(rows)
    start = 0
    for local, count in enumerate(tokens_per_expert):
        out[start : start + count] = expert_fn(rows[start : start + count], first_expert + local)
        start += count
    return out


def rank_slice(case: dict[str, Any], rank: int) -> slice:
    starts = [0, *torch.tensor(case["tokens"]).cumsum(0).tolist()]
    return slice(starts[rank], starts[rank + 1])


class ToyExperts(nn.Module):
    """SwiGLU experts holding only this rank's block (as model code does from the Topology)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, seed: int):
        super().__init__()
        self.local_experts = topology.current().local_experts(num_experts)
        g = torch.Generator().manual_seed(seed)
        # Full weights drawn identically everywhere, then sliced: the unsharded model sees the same values.
        w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
        w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
        block = slice(self.local_experts.start, self.local_experts.stop)
        self.w13 = nn.Parameter(w13[block].clone(), requires_grad=False)
        self.w2 = nn.Parameter(w2[block].clone(), requires_grad=False)

    def forward(self, rows: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        out = torch.empty_like(rows)
        start = 0
        for local, count in enumerate(tokens_per_expert):
            gate, up = F.linear(rows[start : start + count], self.w13[local]).chunk(2, dim=-1)
            out[start : start + count] = F.linear(F.silu(gate) * up, self.w2[local])
            start += count
        return out


class ToyMoE(nn.Module):
    """Softmax top-k router + experts behind `self.dispatcher`; knows nothing about process groups."""

    def __init__(self, num_experts: int, hidden: int, inter: int, top_k: int, seed: int):
        super().__init__()
        from moefleet.engine.layers.token_dispatch import LocalDispatcher

        g = torch.Generator().manual_seed(seed + 1)
        self.gate = nn.Parameter(torch.randn(num_experts, hidden, generator=g), requires_grad=False)
        self.top_k = top_k
        self.experts = ToyExperts(num_experts, hidden, inter, seed)
        self.dispatcher: Any = LocalDispatcher(len(self.experts.local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x, self.gate).softmax(-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        d = self.dispatcher.dispatch_finish(self.dispatcher.dispatch_start(x, ids, weights))
        out = self.experts(d.hidden, d.tokens_per_expert)
        return self.dispatcher.combine_finish(self.dispatcher.combine_start(out, d))


class ToyModel(nn.Module):
    def __init__(self, num_layers: int = 2, num_experts: int = 8, hidden: int = 16, inter: int = 12):
        super().__init__()
        self.layers = nn.ModuleList(
            ToyMoE(num_experts, hidden, inter, 2, seed=7 * i) for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def moe_inputs(world_size: int) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, 9, (world_size,), generator=g)
    tokens[0] = 0  # rank 0 idle: it must still take part in every layer's exchange
    return tokens.tolist(), torch.randn(int(tokens.sum()), 16, generator=g)


def dp_infos(world_size: int, step: int) -> list[StepInfo]:
    """A different mix each step: idle ranks, one prefilling rank, TBO votes."""
    infos = []
    for rank in range(world_size):
        has_work = (rank + step) % 3 != 0
        infos.append(
            StepInfo(
                num_tokens=(rank + 1) * (step + 1) if has_work else 0,
                is_prefill=has_work and (rank + step) % 4 == 1,
                has_work=has_work,
                can_use_tbo=(rank + step) % 5 != 2,
                can_use_graph=step % 2 == 0,
            )
        )
    return infos


# ---- scenarios ----------------------------------------------------------------------------------------
def scenario_all(state: groups.ProcessGroups) -> dict[str, Any]:
    rank, world = state.rank, state.world_size
    result: dict[str, Any] = {"rank": rank, "world_size": world}
    # 1. dispatch + combine on every case, one dispatcher per case.
    per_case = []
    for case in dispatch_cases(world):
        mine = rank_slice(case, rank)
        dispatcher = AllToAllDispatcher(state.device_group, NUM_EXPERTS)
        pending = dispatcher.dispatch_start(case["hidden"][mine], case["ids"][mine], case["w"][mine])
        d = dispatcher.dispatch_finish(pending)
        out = run_experts(d.hidden, d.tokens_per_expert, rank * dispatcher.num_local_experts)
        combined = dispatcher.combine_finish(dispatcher.combine_start(out, d))
        per_case.append({"rows": d.hidden, "counts": d.tokens_per_expert, "out": combined})
    result["cases"] = per_case
    # 2. two micro-batches in flight at once (TBO launch order), one dispatcher each.
    cases = dispatch_cases(world)
    a, b = cases[0], cases[1]
    da, db = (
        AllToAllDispatcher(state.device_group, NUM_EXPERTS),
        AllToAllDispatcher(state.device_group, NUM_EXPERTS),
    )
    sa, sb = rank_slice(a, rank), rank_slice(b, rank)
    pa = da.dispatch_start(a["hidden"][sa], a["ids"][sa], a["w"][sa])
    pb = db.dispatch_start(b["hidden"][sb], b["ids"][sb], b["w"][sb])
    ra, rb = da.dispatch_finish(pa), db.dispatch_finish(pb)
    first = rank * da.num_local_experts
    ca = da.combine_start(run_experts(ra.hidden, ra.tokens_per_expert, first), ra)
    cb = db.combine_start(run_experts(rb.hidden, rb.tokens_per_expert, first), rb)
    out_b = db.combine_finish(cb)  # finish in the other order than started: handles are per dispatcher
    out_a = da.combine_finish(ca)
    result["tbo"] = [out_a, out_b]
    # 3. a model with experts sharded per rank, EP applied from outside.
    ep.set_expert_parallel_layout(state.device_group)
    model = ToyModel()
    result["moe_layers"] = ep.apply_expert_parallel(model, state.device_group, "a2a")
    result["expert_params"] = ep.count_routed_expert_parameters(model)
    tokens, x = moe_inputs(world)
    starts = [0, *torch.tensor(tokens).cumsum(0).tolist()]
    with torch.no_grad():
        result["moe_out"] = model(x[starts[rank] : starts[rank + 1]])
    topology.set_current(topology.Topology())
    # 4. DP step agreement over the CPU group.
    coordinator = DPStepCoordinator(state.cpu_group)
    result["dp"] = [coordinator.sync(dp_infos(world, step)[rank]) for step in range(6)]
    # 5. request hand-over: rank 0 submits, ranks echo request ids back as outputs.
    router = RequestRouter(state.cpu_group)
    if router.is_front_end:
        for i in range(7):
            router.submit(AddRequest(f"r{i}", {"prompt": [i]}, cost=i + 1))
        router.submit(AbortRequest("r3"))
    got: list[Any] = []
    delivered: list[tuple[int, list[Any]]] = []
    outputs: list[Any] = []
    for step in range(3):
        load = 10 * rank if step == 0 else 0
        stats = {"num_running": float(rank + 1), "kv_blocks_used": float(10 * rank + step)}
        messages = router.exchange(load, outputs, lambda r, outs: delivered.append((r, outs)), stats)
        got.append(messages)
        outputs = [m.request_id for m in messages if isinstance(m, AddRequest)]
    result["router_got"] = got
    result["router_delivered"] = delivered
    result["router_owners"] = dict(router.owners)
    result["router_rank_stats"] = router.rank_stats  # front end: every rank's stats of the last exchange
    return result


def scenario_fingerprint(options: dict[str, Any]) -> None:
    """Start-up checks: exits 3 with the error text on stderr, 0 if the group formed."""
    launch = Topology.from_env()
    layers = 2 + launch.rank if options.get("differ") == "model" else 2
    try:
        state = groups.init_distributed(
            launch, hf_config={"model_type": "toy", "layers": layers}, timeout_s=20
        )
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(3)
    groups.shutdown(state)


def scenario_watchdog(mode: str) -> None:
    launch = Topology.from_env()
    state = groups.init_distributed(launch, timeout_s=20, collective_timeout_s=60)
    watchdog = Watchdog(launch, interval_s=0.2, timeout_s=2.0).start()
    dist.barrier(group=state.cpu_group)
    print("READY", flush=True)
    with guard(state.store, state.rank):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if mode == "collective":
                dist.all_reduce(torch.ones(1), group=state.cpu_group)
            time.sleep(0.05)
    watchdog.stop()
    print("watchdog did not fire", flush=True)
    sys.exit(5)


def _engine_rank(model: str, max_model_len: int, backend: str, **config_options: Any) -> tuple[Any, Any, Any]:
    """This rank's (ProcessGroups, engine, DPEngineLoop) on a tiny checkpoint, from the launch env."""
    from moefleet.engine.config import EngineConfig
    from moefleet.engine.distributed.engine_glue import DPEngineLoop, build_engine

    config = EngineConfig(model=model, max_model_len=max_model_len, num_kv_blocks=64, **config_options)
    launch = Topology.from_env()
    state = groups.init_distributed(launch, hf_config=config.hf_config, timeout_s=30, collective_timeout_s=60)
    engine = build_engine(config, state, backend=backend)
    return state, engine, DPEngineLoop(engine, RequestRouter(state.cpu_group))


def scenario_engine(options: dict[str, Any], out_dir: str) -> None:
    """The real engine on a tiny checkpoint: DP ranks + EP MoE; rank 0 serves through DPFrontEndClient
    (as the HTTP server would), the other ranks run `run_worker_rank`."""
    import asyncio

    from moefleet.engine.entrypoints.dp_client import DPFrontEndClient, run_worker_rank
    from moefleet.engine.sampling_params import SamplingParams

    state, engine, loop = _engine_rank(
        options["model"], 128, options.get("backend", "a2a"), **options.get("engine", {})
    )
    result: dict[str, Any] = {"expert_params": ep.count_routed_expert_parameters(engine.model_runner.model)}
    graphs = None
    if options.get("stand_in_graphs"):  # decode steps replay "graphs" that re-run the step on static buffers
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from support.stand_in_graphs import install_stand_in_graphs, replays_by_bucket

        graphs = install_stand_in_graphs(engine.model_runner)
        before_replay: list[int] = []  # a dispatcher's pre-replay hook (DeepEP cleans its buffer there)
        engine.model_runner._before_replay.append(lambda: before_replay.append(engine.num_steps_total))
    if state.rank == 0:
        client = DPFrontEndClient(loop)
        client.start()
        greedy = SamplingParams(temperature=0, max_tokens=options["max_tokens"], ignore_eos=True)

        async def one(request_id: str, prompt: list[int]) -> Any:
            tokens: list[int] = []
            try:
                async for out in client.generate(request_id, prompt, greedy):
                    tokens.extend(out.new_token_ids)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return tokens

        async def everything() -> list[Any]:
            prompts = {f"p{i}": p for i, p in enumerate(options["prompts"])}
            prompts["bad"] = [10**9]  # outside the vocabulary: the owning rank refuses it
            results = await asyncio.gather(*(one(rid, p) for rid, p in prompts.items()))
            return dict(zip(prompts, results, strict=True))

        result["tokens"] = asyncio.run(everything())
        if "lone_prompt" in options:  # one request alone: the other ranks run idle steps meanwhile
            result["lone"] = asyncio.run(one("lone", options["lone_prompt"]))
        client.shutdown()
    else:
        run_worker_rank(loop, state)
    result["prompt_tokens_total"] = engine.stats()["prompt_tokens_total"]
    result["tbo_steps_total"] = engine.stats()["tbo_steps_total"]
    result["num_steps_total"] = engine.num_steps_total
    if graphs is not None:
        result["graph_replays"] = replays_by_bucket(graphs)
        result["before_replay_calls"] = len(before_replay)
    torch.save(result, os.path.join(out_dir, f"rank{state.rank}.pt"))
    groups.shutdown(state)


def scenario_eplb(options: dict[str, Any], out_dir: str) -> None:
    """The real engine with redundant experts and a live rebalance: rank 0 streams greedy requests through
    DPFrontEndClient and asks for a rebalance (every rank moves weights at the same step boundary, one layer
    per boundary) while they run, then runs the prompts again on the new placement. Every rank saves its slot
    weights and the logical expert of each slot, before and after."""
    import asyncio

    from moefleet.engine.config import EngineConfig
    from moefleet.engine.distributed.engine_glue import DPEngineLoop, build_engine
    from moefleet.engine.entrypoints.dp_client import DPFrontEndClient, run_worker_rank
    from moefleet.engine.eplb.config import EPLBConfig
    from moefleet.engine.sampling_params import SamplingParams

    config = EngineConfig(model=options["model"], max_model_len=128, num_kv_blocks=64)
    state = groups.init_distributed(
        Topology.from_env(), hf_config=config.hf_config, timeout_s=30, collective_timeout_s=60
    )
    interval = options.get("interval", 0)
    eplb = EPLBConfig(
        num_redundant_experts=options["redundant"], layers_per_step=1, stats_every_steps=10**6,
        interval_steps=interval,
    )  # fmt: skip
    engine = build_engine(config, state, backend="a2a", eplb=eplb)
    loop = DPEngineLoop(engine, RequestRouter(state.cpu_group))
    controller = engine.eplb

    def slots() -> list[dict[str, Any]]:
        return [
            {"local_experts": list(layer.experts.local_experts), "w13": layer.experts.w13.clone(),
             "w2": layer.experts.w2.clone(), "layer": index}
            for layer, index in zip(controller.layers, controller.layer_ids, strict=True)
        ]  # fmt: skip

    result: dict[str, Any] = {"before": slots()}
    if state.rank == 0:
        client = DPFrontEndClient(loop)
        client.start()
        greedy = SamplingParams(temperature=0, max_tokens=options["max_tokens"], ignore_eos=True)

        async def one(request_id: str, prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            async for out in client.generate(request_id, prompt, greedy):
                tokens.extend(out.new_token_ids)
            return tokens

        async def run_all(tag: str) -> dict[str, list[int]]:
            prompts = {f"{tag}{i}": p for i, p in enumerate(options["prompts"])}
            results = await asyncio.gather(*(one(rid, p) for rid, p in prompts.items()))
            return dict(zip(prompts, results, strict=True))

        async def everything() -> None:
            result["warmup"] = await run_all("w")  # fill the load window
            streaming = asyncio.ensure_future(run_all("s"))
            await asyncio.sleep(0.05)  # requests are in flight when the rebalance starts
            if not interval:  # else the controller rebalances by itself every `interval` steps
                result["rebalance"] = await asyncio.wrap_future(controller.submit("rebalance"))
            result["during"] = await streaming
            result["after"] = await run_all("a")
            result["state"] = await asyncio.wrap_future(controller.submit("read"))

        asyncio.run(everything())
        client.shutdown()
    else:
        run_worker_rank(loop, state)
    result["after_slots"] = slots()
    result["phy2log"] = controller.location.phy2log
    result["rebalances_total"] = controller.rebalances_total
    torch.save(result, os.path.join(out_dir, f"rank{state.rank}.pt"))
    groups.shutdown(state)


def scenario_engine_peer_dies(options: dict[str, Any]) -> None:
    """Rank 0 streams a long request through DPFrontEndClient; the test kills rank 1 mid-stream. The client
    must get an error (printed here) and rank 0 must then exit with the watchdog code, not hang."""
    import asyncio

    from moefleet.engine.entrypoints.dp_client import DPFrontEndClient, run_worker_rank
    from moefleet.engine.sampling_params import SamplingParams

    state, _, loop = _engine_rank(options["model"], 512, "a2a")
    if state.rank != 0:
        print("READY", flush=True)
        run_worker_rank(loop, state)
        return
    client = DPFrontEndClient(loop, state, exit_grace_s=0.5)
    client.start()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def stream() -> None:
        count = 0
        try:
            # Two requests so each rank owns one: rank 1's death breaks the group's collectives.
            async def consume(request_id: str) -> None:
                nonlocal count
                async for out in client.generate(request_id, [5, 6, 7], params):
                    count += len(out.new_token_ids)
                    if count == 4:
                        print("READY", flush=True)

            await asyncio.gather(consume("a"), consume("b"))
            print(f"FINISHED without error after {count} tokens", flush=True)
        except Exception as exc:
            print(f"CLIENT GOT {type(exc).__name__}: {exc}", flush=True)

    asyncio.run(stream())
    time.sleep(30)  # the client thread exits the process (code 17) within its grace period


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    options = json.loads(os.environ.get("MOEFLEET_TEST_OPTIONS", "{}"))
    if scenario == "fingerprint":
        scenario_fingerprint(options)
        return
    if scenario == "engine":
        torch.set_num_threads(1)
        scenario_engine(options, out_dir)
        return
    if scenario == "eplb":
        torch.set_num_threads(1)
        scenario_eplb(options, out_dir)
        return
    if scenario == "engine-peer-dies":
        torch.set_num_threads(1)
        scenario_engine_peer_dies(options)
        return
    if scenario.startswith("watchdog-"):
        scenario_watchdog(scenario.removeprefix("watchdog-"))
        return
    launch = Topology.from_env()
    state = groups.init_distributed(launch, timeout_s=30, collective_timeout_s=60)
    result = scenario_all(state)
    torch.save(result, os.path.join(out_dir, f"rank{state.rank}.pt"))
    dist.barrier(group=state.cpu_group)
    groups.shutdown(state)


if __name__ == "__main__":
    main()
