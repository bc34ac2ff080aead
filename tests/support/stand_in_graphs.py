"""Stand-ins for captured CUDA graphs on CPU: `CudaGraphRunner`'s replay path (bucket choice, static fill with
padding rows, output slicing) and the engine's graph steps run for real, while each bucket's "graph" re-runs the
captured step eagerly over the static buffers into the bucket's output, which is what a replay computes.
Needs the Triton attention backend (interpreted on CPU): it reads only the static tensors, as in a graph."""

from __future__ import annotations

from typing import Any

from moefleet.engine.cuda_graph_runner import CudaGraphRunner, static_batch


class StandInGraph:
    def __init__(self, runner: CudaGraphRunner, bucket: int):
        self.runner, self.bucket = runner, bucket
        self.replays = 0

    def replay(self) -> None:
        runner = self.runner
        batch = static_batch(runner.static, self.bucket, runner.block_size, runner.backend)
        runner.outputs[self.bucket] = runner._step(batch)
        self.replays += 1


def stand_in_graph_runner(model: Any, backend: Any, **options: Any) -> CudaGraphRunner:
    """A CudaGraphRunner (same options) whose every bucket holds a StandInGraph."""
    runner = CudaGraphRunner(model, backend, **options)
    for bucket in runner.sizes:
        runner.graphs[bucket] = StandInGraph(runner, bucket)
    return runner


def install_stand_in_graphs(model_runner: Any) -> CudaGraphRunner:
    """Give an engine's ModelRunner stand-in graphs for every bucket its config would capture."""
    runner = stand_in_graph_runner(**model_runner.graph_runner_options())
    model_runner.graph_runner = runner
    return runner


def replays_by_bucket(runner: CudaGraphRunner) -> dict[int, int]:
    return {bucket: graph.replays for bucket, graph in runner.graphs.items() if graph.replays}
