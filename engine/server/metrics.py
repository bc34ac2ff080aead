"""Prometheus metrics of one server: request outcomes, token counts, latency histograms, engine load.

Each app gets its own `CollectorRegistry` (several servers in one test process must not collide). Load
gauges are read from the engine client's stats snapshot at scrape time, so they are never stale and the
engine thread is never touched by the scraper. In a DP group they describe the whole group (the front end
receives every rank's stats with each step's request exchange) and are repeated per rank with a `dp_rank`
label under `moefleet_dp_rank_*`. Names: `moefleet_` prefix, base units, counters `_total`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Latency buckets sized for LLM serving: TTFT spans ms (short prompt, idle server) to a minute (long prompt
# behind a queue); inter-token latency is ms to ~1 s; end-to-end up to many minutes for long generations.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)

# stats() key -> (metric name, help). Every name describes the whole DP group (summed over its ranks); the
# same numbers per rank are exported as `moefleet_dp_rank_<suffix>{dp_rank="r"}` (see `rank_series_name`).
_LOAD_GAUGES = {
    "num_running": (
        "moefleet_num_requests_running",
        "Requests currently scheduled in the engine (prefill or decode), all DP ranks of the group.",
    ),
    "num_waiting": (
        "moefleet_num_requests_waiting",
        "Requests queued in the engine, not yet scheduled, all DP ranks of the group.",
    ),
    "num_waiting_for_kv": (
        "moefleet_num_requests_waiting_for_kv",
        "Decode role: requests holding reserved KV blocks while their prompt's KV is sent by a prefill group.",
    ),
    "num_sending_kv": (
        "moefleet_num_requests_sending_kv",
        "Prefill role: requests whose KV blocks are being sent to a decode group (freed once acknowledged).",
    ),
    "kv_usage": (
        "moefleet_kv_cache_usage_ratio",
        "KV cache blocks in use / blocks allocated, over all DP ranks of the group (0..1).",
    ),
    "kv_blocks_used": ("moefleet_kv_cache_blocks_used", "KV cache blocks in use, all DP ranks of the group."),
    "kv_blocks_total": (
        "moefleet_kv_cache_blocks_capacity",
        "KV cache blocks allocated, all DP ranks of the group.",
    ),
}
# Engine counters (monotonic per rank, so their sum over the group is monotonic too).
_ENGINE_COUNTERS = {
    "num_preemptions_total": (
        "moefleet_num_preemptions",  # exported as moefleet_num_preemptions_total
        "Running requests preempted (KV blocks freed, recomputed later), all DP ranks of the group.",
    ),
}
_SUMMED = (
    "num_running",
    "num_waiting",
    "num_waiting_for_kv",
    "num_sending_kv",
    "kv_blocks_used",
    "kv_blocks_total",
    "num_preemptions_total",
)

# No `<counter|histogram>_created` series: the exposition passes `promtool check metrics` (process-wide switch).
disable_created_metrics()


def rank_series_name(name: str) -> str:
    """`moefleet_num_requests_running` -> `moefleet_dp_rank_num_requests_running` (one series per rank)."""
    return "moefleet_dp_rank_" + name.removeprefix("moefleet_")


def group_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Pure: one DP group's load from its ranks' `LLMEngine.stats()`. Counts and blocks are summed; the KV
    usage ratio is blocks used / blocks allocated over the whole group (not a sum or mean of ratios)."""
    totals = {key: float(sum(stats.get(key, 0.0) for stats in per_rank)) for key in _SUMMED}
    blocks = totals["kv_blocks_total"]
    totals["kv_usage"] = totals["kv_blocks_used"] / blocks if blocks > 0 else 0.0
    return totals


class _EngineLoadCollector(Collector):
    """Group-wide load gauges and engine counters, plus one `dp_rank`-labelled series per rank."""

    def __init__(self, read_rank_stats: Callable[[], list[dict[str, float]]]):
        self._read_rank_stats = read_rank_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        per_rank = self._read_rank_stats()
        if not per_rank:  # a node that is not its group's front end: the front end exports the group
            return
        group = group_stats(per_rank)
        for key, (name, documentation) in _LOAD_GAUGES.items():
            yield GaugeMetricFamily(name, documentation, value=group[key])
        for key, (name, documentation) in _ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, documentation, value=group[key])
        for key, (name, documentation) in _LOAD_GAUGES.items():
            family = GaugeMetricFamily(
                rank_series_name(name), f"Per DP rank: {documentation}", labels=["dp_rank"]
            )
            for rank, stats in enumerate(per_rank):
                family.add_metric([str(rank)], float(stats.get(key, 0.0)))
            yield family


class ServerMetrics:
    """All metrics of one server, registered in a registry of its own."""

    def __init__(
        self,
        read_stats: Callable[[], dict[str, float]],
        read_rank_stats: Callable[[], list[dict[str, float]]] | None = None,
    ):
        """`read_rank_stats` gives one stats dict per DP rank of the group (front end of a DP group), an
        empty list on a node that exports no load (its group's front end does); without it, `read_stats` is
        the only rank (single-process server)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "moefleet_requests",
            "Finished requests by finish reason (stop, length, abort = client gone or aborted, error).",
            ["finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "moefleet_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "moefleet_generation_tokens", "Generated tokens of finished requests.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "moefleet_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "moefleet_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "moefleet_e2e_request_latency_seconds",
            "Time from request arrival to its last token (or abort/error).",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineLoadCollector(read_rank_stats or (lambda: [read_stats()])))
        register_eplb_metrics(self.registry)
        self.registry.register(_TBOCollector(read_rank_stats or (lambda: [read_stats()])))
        self.registry.register(_MoECommCollector(read_rank_stats or (lambda: [read_stats()])))
        for reason in ("stop", "length", "abort", "error"):
            self.requests.labels(finish_reason=reason)  # export zeros so rates work from the start

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Timing and token accounting of one request; `finish` is recorded exactly once."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._arrival = time.perf_counter()
        self._last_token_time: float | None = None
        self._done = False
        self.prompt_tokens = 0
        self.output_tokens = 0

    def on_output(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.perf_counter()
        if self._last_token_time is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            # One engine step may yield several tokens (e.g. speculative decoding later): spread the gap.
            gap = (now - self._last_token_time) / num_new_tokens
            for _ in range(num_new_tokens):
                self._metrics.inter_token_latency.observe(gap)
        self._last_token_time = now
        self.output_tokens += num_new_tokens

    def finish(self, finish_reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.requests.labels(finish_reason=finish_reason).inc()
        self._metrics.prompt_tokens.inc(self.prompt_tokens)
        self._metrics.generation_tokens.inc(self.output_tokens)
        self._metrics.e2e_request_latency.observe(time.perf_counter() - self._arrival)


# ---- EPLB (expert-parallel load balancing) ---------------------------------------------------------------
# Read from this process's EPLBController (one rank per process) at scrape time; nothing is exported when
# EPLB is off. Values are the last group-wide reading (refreshed every `stats_every_steps` engine steps and
# on GET /admin/eplb), so scraping never triggers a collective. No per-expert series (bounded cardinality).
EPLB_REBALANCE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EPLBCollector(Collector):
    def __init__(self, find_controller: Callable[[], object | None]):
        self._find = find_controller

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        eplb: Any = self._find()
        if eplb is None:
            return
        snap = eplb.snapshot
        yield GaugeMetricFamily(
            "moefleet_eplb_balancedness",
            "Mean over MoE layers of mean/max per-GPU routed load in the EPLB window (1 = perfectly balanced).",
            value=float(snap.balancedness),
        )
        layers = GaugeMetricFamily(
            "moefleet_eplb_layer_balancedness",
            "Per MoE layer: mean/max per-GPU routed load.",
            labels=["layer"],
        )
        for layer, value in zip(eplb.layer_ids, snap.per_layer, strict=False):
            layers.add_metric([str(layer)], float(value))
        yield layers
        yield CounterMetricFamily(
            "moefleet_eplb_rebalances", "Expert rebalances completed.", value=float(eplb.rebalances_total)
        )
        durations = list(eplb.rebalance_seconds)
        cumulative = [float(sum(1 for d in durations if d <= bound)) for bound in EPLB_REBALANCE_BUCKETS]
        yield HistogramMetricFamily(
            "moefleet_eplb_rebalance_seconds",
            "Time the serving loop paused for each rebalance (all layer chunks).",
            buckets=[(str(b), c) for b, c in zip(EPLB_REBALANCE_BUCKETS, cumulative, strict=True)]
            + [("+Inf", float(len(durations)))],
            sum_value=float(sum(durations)),
        )
        routed = CounterMetricFamily(
            "moefleet_eplb_routed_tokens",
            "(token, expert) assignments routed by this rank, summed over MoE layers.",
            labels=["rank"],
        )
        routed.add_metric([str(eplb.rank)], float(eplb.routed_tokens_total))
        yield routed


def register_eplb_metrics(
    registry: CollectorRegistry, find_controller: Callable[[], object | None] | None = None
) -> None:
    """Export this process's EPLB state (the controller found by `find_controller`, default: the current one)."""
    if find_controller is None:
        from moefleet.engine.eplb.controller import current

        find_controller = current
    registry.register(_EPLBCollector(find_controller))


# ---- Two-batch overlap (engine/tbo.py) ------------------------------------------------------------------
# From the same per-rank stats as the load gauges (so scraping never triggers a collective). Every rank of a
# group runs the same steps with TBO (the step agreement), so the group's count is any rank's: the max.


class _TBOCollector(Collector):
    def __init__(self, read_rank_stats: Callable[[], list[dict[str, float]]]):
        self._read_rank_stats = read_rank_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        per_rank = self._read_rank_stats()
        if not per_rank:
            return
        yield CounterMetricFamily(
            "moefleet_tbo_steps",  # exported as moefleet_tbo_steps_total
            "Engine steps run as two overlapped micro-batches (two-batch overlap).",
            value=max(float(stats.get("tbo_steps_total", 0.0)) for stats in per_rank),
        )
        imbalance = GaugeMetricFamily(
            "moefleet_tbo_split_imbalance",
            "Per DP rank: |cost0 - cost1| / (cost0 + cost1) of the last two-batch split (attention cost; "
            "0 = even, 1 = one micro-batch empty).",
            labels=["dp_rank"],
        )
        for rank, stats in enumerate(per_rank):
            imbalance.add_metric([str(rank)], float(stats.get("tbo_last_split_imbalance", 0.0)))
        yield imbalance


# ---- MoE dispatch / combine (engine/dispatch_metrics.py) -------------------------------------------------
# Each rank samples its own dispatch/combine (one forward in N) and sends cumulative numbers with its stats;
# the front end exports them per rank. Ranks without expert-parallel dispatchers send none: nothing exported.


class _MoECommCollector(Collector):
    def __init__(self, read_rank_stats: Callable[[], list[dict[str, float]]]):
        self._read_rank_stats = read_rank_stats

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        from moefleet.engine import dispatch_metrics as dm

        ranks = [(r, stats) for r, stats in enumerate(self._read_rank_stats()) if dm.FORWARDS_KEY in stats]
        if not ranks:
            return
        for part in dm.PARTS:
            family = HistogramMetricFamily(
                f"moefleet_moe_{part}_seconds",
                f"Per DP rank: MoE {part} time per layer, {part}_start to {part}_finish, in sampled forward "
                f"passes (one in {dm.ENV_EVERY}; CUDA events on GPU).",
                labels=["dp_rank"],
            )
            bounds = [*(str(b) for b in dm.SECONDS_BUCKETS), "+Inf"]
            for rank, stats in ranks:
                buckets = [(le, float(stats.get(dm.bucket_key(part, i), 0.0))) for i, le in enumerate(bounds)]
                family.add_metric([str(rank)], buckets, sum_value=float(stats.get(dm.sum_key(part), 0.0)))
            yield family
        sent = CounterMetricFamily(
            "moefleet_moe_dispatch_bytes",  # exported as moefleet_moe_dispatch_bytes_total
            "Per DP rank: bytes the rank's experts received by dispatch (rows x hidden x element size), in sampled "
            "forward passes (divide by moefleet_moe_sampled_forwards_total for bytes per forward).",
            labels=["dp_rank"],
        )
        forwards = CounterMetricFamily(
            "moefleet_moe_sampled_forwards",
            "Per DP rank: forward passes whose MoE dispatch/combine were measured.",
            labels=["dp_rank"],
        )
        dropped = CounterMetricFamily(
            "moefleet_moe_graph_samples_dropped",
            "Per DP rank: sampled CUDA-graph replays whose measurements were dropped unread because their graph "
            "was launched again before they completed (0 in the engine, which reads each step's tokens).",
            labels=["dp_rank"],
        )
        for rank, stats in ranks:
            sent.add_metric([str(rank)], float(stats[dm.BYTES_KEY]))
            forwards.add_metric([str(rank)], float(stats[dm.FORWARDS_KEY]))
            dropped.add_metric([str(rank)], float(stats.get(dm.DROPPED_KEY, 0.0)))
        yield sent
        yield forwards
        yield dropped
