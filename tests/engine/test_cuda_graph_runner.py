"""The pure parts of CUDA-graph decode (engine/cuda_graph_runner.py) on CPU: bucket sizes and choice, the
on/off decision, and the static-buffer fill. The padded static batch is run through a tiny model with the
Triton backend (interpreted) and its first n rows must equal the eager step: what a replay computes,
minus the graph itself (tests/gpu/test_cuda_graphs.py captures and replays on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moefleet.engine.cuda_graph_runner import (  # noqa: E402
    StaticInputs,
    bucket_for,
    capture_batch_sizes,
    decide_cuda_graphs,
    fill_static,
    static_batch,
)
from moefleet.engine.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from support.stand_in_graphs import replays_by_bucket, stand_in_graph_runner  # noqa: E402


def test_capture_sizes_and_buckets():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_batch_sizes(320, extra=[24, 1000])
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-3:] == [256, 288, 320] and 1000 not in sizes
    assert bucket_for(1, sizes) == 1 and bucket_for(3, sizes) == 4 and bucket_for(17, sizes) == 24
    assert bucket_for(320, sizes) == 320 and bucket_for(321, sizes) is None
    with pytest.raises(ValueError, match="max_batch_size"):
        capture_batch_sizes(0)


def test_decide_cuda_graphs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decide_cuda_graphs("auto", cuda, True, False)[0] is True
    assert decide_cuda_graphs("off", cuda, True, False)[0] is False
    assert decide_cuda_graphs("auto", cpu, True, False)[0] is False
    assert "attention backend" in decide_cuda_graphs("auto", cuda, False, False)[1]
    assert "expert-parallel" in decide_cuda_graphs("auto", cuda, True, True, ep_sync_free=True)[1]
    assert decide_cuda_graphs("on", cuda, True, False)[0] is True  # one rank: the same as auto
    with pytest.raises(ValueError, match="cuda_graphs"):
        decide_cuda_graphs("always", cuda, True, False)


def _decode_batch():
    return ForwardBatch.build(
        input_ids=[11, 12, 13], positions=[40, 7, 18], query_lens=[1, 1, 1], seq_lens=[41, 8, 19],
        block_tables=[[5, 2, 9], [3], [4, 6]], block_size=16, device="cpu",
    )  # fmt: skip


def test_fill_static_pads_rows_safely():
    static = StaticInputs.allocate(8, 4, torch.device("cpu"))
    static.block_tables.fill_(77)  # stale pages of an earlier step
    static.input_ids.fill_(99)
    fill_static(static, _decode_batch(), bucket=4)
    assert static.input_ids.tolist() == [11, 12, 13, 0, 99, 99, 99, 99]  # rows past the bucket untouched
    assert static.positions[:4].tolist() == [40, 7, 18, 0]
    assert static.slot_mapping[:4].tolist() == [9 * 16 + 8, 3 * 16 + 7, 6 * 16 + 2, -1]
    assert static.seq_lens[:4].tolist() == [41, 8, 19, 1]
    assert static.block_tables[:4, :3].tolist() == [[5, 2, 9], [3, -1, -1], [4, 6, -1], [0, 77, 77]]
    batch = static_batch(static, 4, 16, backend=None)
    assert batch.mode is ForwardMode.DECODE and batch.for_cuda_graph and batch.num_tokens == 4
    assert batch.cu_query_lens.tolist() == [0, 1, 2, 3, 4] and batch.sample_indices.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="does not fit"):
        fill_static(static, _decode_batch(), bucket=2)
    prefill = ForwardBatch.prefill_without_cache([2], "cpu")
    with pytest.raises(ValueError, match="only decode"):
        fill_static(static, prefill, bucket=4)


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_padded_static_batch_equals_eager_decode(name):
    pytest.importorskip("moefleet.engine.kernels.paged_attention")
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend
    from moefleet.engine.loader import load_model
    from support.tiny_models import PagedDriver, tiny_model_dir

    backend = TritonAttentionBackend()
    model = load_model(tiny_model_dir(name), "cpu", torch.float32)
    driver = PagedDriver(model, num_blocks=16, block_size=16, attn_backend=backend)
    driver.step([(0, list(range(3, 23))), (1, list(range(5, 12))), (2, [7, 8, 9])])
    decode = driver.batch([(0, [30]), (1, [31]), (2, [32])])
    with torch.no_grad():
        eager = model.compute_logits(model(decode.input_ids, decode.positions, decode))
        static = StaticInputs.allocate(8, 4, torch.device("cpu"))
        fill_static(static, decode, bucket=8)
        padded = static_batch(static, 8, 16, backend)
        graph_like = model.compute_logits(model(padded.input_ids, padded.positions, padded))
    assert torch.isfinite(graph_like).all()
    torch.testing.assert_close(graph_like[:3], eager, atol=1e-4, rtol=1e-4)


def test_replay_plumbing_with_a_stand_in_graph():
    """`CudaGraphRunner.replay` on CPU with a stand-in for the captured graph (it re-runs the step on the
    static batch into the static output, as a replay would): buckets, fill and output slicing are right,
    and `can_run` refuses what no graph covers."""
    pytest.importorskip("moefleet.engine.kernels.paged_attention")
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend
    from moefleet.engine.loader import load_model
    from support.tiny_models import PagedDriver, tiny_model_dir

    backend = TritonAttentionBackend()
    model = load_model(tiny_model_dir("qwen3_norm_topk"), "cpu", torch.float32)
    driver = PagedDriver(model, num_blocks=16, block_size=16, attn_backend=backend)
    runner = stand_in_graph_runner(
        model, backend, max_batch_size=4, max_blocks_per_seq=4, block_size=16, device=torch.device("cpu")
    )
    vocab = model.config.vocab_size
    assert runner.sizes == [1, 2, 4]
    with torch.no_grad():
        driver.step([(0, list(range(3, 23))), (1, list(range(5, 12))), (2, [7, 8, 9])])
        decode = driver.batch([(0, [30]), (1, [31]), (2, [32])])
        assert runner.can_run(decode)
        eager = runner._step(decode)
        replayed = runner.replay(decode)
    assert replayed.shape == (3, vocab)
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
    assert runner.static.slot_mapping[3].item() == -1  # the pad row of bucket 4 writes nothing
    mixed = driver.batch([(0, [1]), (3, [1, 2])])
    assert not runner.can_run(mixed)  # not a decode step
    # an expert-parallel group's step: this rank decodes 3 sequences, another rank 2 -> bucket 4 here; 0 here
    # (idle) while another decodes 2 -> bucket 2, all padding, no rows returned
    with torch.no_grad():
        assert runner.replay(decode, group_tokens=2).shape == (3, vocab)
        idle = ForwardBatch.build(
            input_ids=[],
            positions=[],
            query_lens=[],
            seq_lens=[],
            block_tables=[],
            block_size=16,
            device="cpu",
        )
        assert runner.can_join(0) and runner.replay(idle, group_tokens=2).shape == (0, vocab)
    assert runner.static.slot_mapping[:2].tolist() == [-1, -1] and runner.static.seq_lens[:2].tolist() == [
        1,
        1,
    ]
    assert replays_by_bucket(runner) == {4: 2, 2: 1}
    assert not runner.can_join(5)  # more sequences than the largest bucket: the rank votes against graphs


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_tbo_step_on_the_padded_static_batch_equals_eager_decode(name):
    """What a capture of the TBO decode step computes (`CudaGraphRunner(tbo=True)._step` on the padded static
    batch: two micro-batches over views of the static buffers, marked for a graph) equals the plain eager
    decode on the live rows; bucket 1 splits one sequence into [1 | 0] (an empty micro-batch of views)."""
    pytest.importorskip("moefleet.engine.kernels.paged_attention")
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend
    from moefleet.engine.cuda_graph_runner import CudaGraphRunner
    from moefleet.engine.loader import load_model
    from moefleet.engine.tbo import plan_split, split_batch
    from support.tiny_models import PagedDriver, tiny_model_dir

    backend = TritonAttentionBackend()
    model = load_model(tiny_model_dir(name), "cpu", torch.float32)
    driver = PagedDriver(model, num_blocks=16, block_size=16, attn_backend=backend)
    runner = CudaGraphRunner(
        model, backend, max_batch_size=8, max_blocks_per_seq=4, block_size=16, device=torch.device("cpu"),
        tbo=True,
    )  # fmt: skip
    with torch.no_grad():
        driver.step([(0, list(range(3, 23))), (1, list(range(5, 12))), (2, [7, 8, 9])])
        decode = driver.batch([(0, [30]), (1, [31]), (2, [32])])
        eager = model.compute_logits(model(decode.input_ids, decode.positions, decode))
        fill_static(runner.static, decode, bucket=8)
        padded = static_batch(runner.static, 8, 16, backend)
        children = split_batch(padded, plan_split(padded.query_lens, padded.seq_lens))
        assert [c.num_seqs for c in children] == [4, 4] and all(c.for_cuda_graph for c in children)
        # views of the static buffers: a replay's new inputs reach both micro-batches
        assert children[1].seq_lens_t.data_ptr() == runner.static.seq_lens[4:].data_ptr()
        tbo_logits = runner._step(padded)
        lone = driver.batch([(2, [33])])
        lone_eager = model.compute_logits(model(lone.input_ids, lone.positions, lone))
        fill_static(runner.static, lone, bucket=1)
        lone_tbo = runner._step(static_batch(runner.static, 1, 16, backend))
    torch.testing.assert_close(tbo_logits[:3], eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lone_tbo, lone_eager, atol=1e-4, rtol=1e-4)


def test_decide_cuda_graphs_in_expert_parallel_groups():
    cuda = torch.device("cuda")
    assert decide_cuda_graphs("auto", cuda, True, True, lockstep=True)[0] is True  # the bench's EP group
    assert decide_cuda_graphs("off", cuda, True, True, lockstep=True)[0] is False
    # the engine's EP group: a2a reads counts on the host, so never; sync-free backends (symm, DeepEP LL) by
    # auto only once verified on GPUs, by `on` before that
    on, why = decide_cuda_graphs("on", cuda, True, True, ep_sync_free=False)
    assert not on and "--moe-backend symm or deepep" in why
    on, why = decide_cuda_graphs("auto", cuda, True, True, ep_sync_free=True, ep_verified=False)
    assert not on and "--cuda-graphs on" in why
    assert decide_cuda_graphs("auto", cuda, True, True, ep_sync_free=True, ep_verified=True)[0] is True
    assert decide_cuda_graphs("on", cuda, True, True, ep_sync_free=True, ep_verified=False)[0] is True
    assert decide_cuda_graphs("on", torch.device("cpu"), True, True, ep_sync_free=True)[0] is False


class _ProbedGraph:
    """A captured graph on the fake GPU of support.fake_cuda_events: a replay re-queues its event nodes."""

    def __init__(self, gpu, nodes, log):
        self.gpu, self.nodes, self.log = gpu, nodes, log

    def replay(self):
        self.log.append("launch")
        self.gpu.replay(self.nodes)


class _NoMetadataBackend:
    def init_forward_metadata_replay(self, batch):
        pass


def test_replay_settles_and_arms_the_buckets_dispatch_probe():
    """`CudaGraphRunner.replay` around the launch of bucket B's graph: B's probe settles its armed sample
    before (harvested once complete, dropped if that replay is still running), counts the forward and arms a
    sampled one after (its done event queued behind the graph); a bucket without a probe (metrics off) replays
    as before. The probe's own bookkeeping: tests/engine/test_dispatch_metrics.py."""
    from moefleet.engine import dispatch_metrics as dm
    from moefleet.engine.cuda_graph_runner import CudaGraphRunner
    from moefleet.engine.dispatch_metrics import DispatchRecorder, MeteredDispatcher
    from moefleet.engine.layers.token_dispatch import LocalDispatcher
    from support.fake_cuda_events import FakeGPU, capture

    recorder, gpu, log = DispatchRecorder(every=2), FakeGPU(), []
    metered = MeteredDispatcher(LocalDispatcher(2), recorder, first=True)

    def forward():
        dispatched = metered.dispatch_finish(
            metered.dispatch_start(torch.ones(3, 4), torch.tensor([[0], [1], [1]]), torch.ones(3, 1))
        )
        metered.combine_finish(metered.combine_start(dispatched.hidden, dispatched))

    probe, nodes = capture(recorder, gpu, forward)
    runner = CudaGraphRunner(
        None, _NoMetadataBackend(), max_batch_size=4, max_blocks_per_seq=4, block_size=16,
        device=torch.device("cpu"),
    )  # fmt: skip
    runner.graphs = {4: _ProbedGraph(gpu, nodes, log), 2: _ProbedGraph(gpu, [], log)}
    runner.outputs = {4: torch.zeros(4, 7), 2: torch.zeros(2, 7)}
    runner.probes = {4: probe}
    for name in ("before_replay", "after_replay"):
        method = getattr(probe, name)
        setattr(probe, name, lambda method=method, name=name: (log.append(name), method()))
    decode = _decode_batch()  # 3 sequences: bucket 4
    runner.replay(decode)  # forward 0: sampled, armed
    assert log == ["before_replay", "launch", "after_replay"]
    assert gpu.queue[: len(nodes)] == nodes and gpu.queue[-1] is probe.armed.done  # done after the graph
    runner.replay(decode)  # forward 1: the armed replay has not run yet -> dropped, never read
    assert probe.dropped == 1 and probe.armed is None
    runner.replay(decode)  # forward 2: sampled
    gpu.run()
    runner.replay(decode)  # forward 3: the completed sample is harvested before the launch
    assert probe.harvested == 1 and probe.replays == 4
    stats = recorder.stats()
    assert stats[dm.FORWARDS_KEY] == 1 and stats[dm.count_key("dispatch")] == 1
    assert stats[dm.BYTES_KEY] == 3 * 4 * 4  # 3 rows x 4 float32
    log.clear()
    runner.replay(ForwardBatch.build(  # 2 sequences: bucket 2, no probe
        input_ids=[1, 2], positions=[3, 4], query_lens=[1, 1], seq_lens=[4, 5], block_tables=[[0], [1]],
        block_size=16, device="cpu",
    ))  # fmt: skip
    assert log == ["launch"] and recorder.forwards == 4
