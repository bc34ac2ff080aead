"""Two-batch overlap on a comm stream (engine/tbo_streams.py), checked on CPU: only the stream API is faked
(a recording `StreamOps`); the tiny model and its dispatcher run for real. The launch order, which stream
each communication runs on, and every event wait are checked against the design by hand; the output equals
the plain forward (float32); on CPU without a fake the stages run with no streams at all."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.token_dispatch import LocalDispatcher
from moefleet.engine.tbo import forward_tbo, stream_schedule
from moefleet.engine.tbo_streams import (
    Overlap,
    StreamOverlap,
    choose_mechanism,
    dispatcher_overlaps,
    make_overlap,
    tensors_in,
)
from support.fake_streams import FakeStreams
from support.forward_batches import three_prompts
from support.tiny_models import tiny_model_dir

pytestmark = pytest.mark.timeout(300)


class Recording:
    """A real LocalDispatcher logging (call, micro-batch, layer, current stream); checks what was kept."""

    def __init__(self, inner, micro_batch, layer, streams: FakeStreams):
        self.inner, self.micro_batch, self.layer, self.streams = inner, micro_batch, layer, streams

    def _log(self, name):
        self.streams.log.append((name, self.micro_batch, self.layer, self.streams.current))

    def dispatch_start(self, hidden, *args, **kwargs):
        self._log("dispatch_start")
        assert id(hidden) in self.streams.kept["comm"]  # its rows are read on the comm stream
        return self.inner.dispatch_start(hidden, *args, **kwargs)

    def dispatch_finish(self, pending):
        self._log("dispatch_finish")
        return self.inner.dispatch_finish(pending)

    def combine_start(self, expert_output, dispatched):
        self._log("combine_start")
        assert id(expert_output) in self.streams.kept["comm"]
        return self.inner.combine_start(expert_output, dispatched)

    def combine_finish(self, pending):
        self._log("combine_finish")
        return self.inner.combine_finish(pending)


@pytest.fixture(scope="module")
def model_and_runner():
    llm = LLM(tiny_model_dir("qwen3_norm_topk"), dtype="float32", max_model_len=64)
    return llm.engine.model_runner.model, llm.engine.model_runner


def test_comm_stages_run_on_the_comm_stream_ordered_by_events(model_and_runner):
    model, runner = model_and_runner
    log: list = []
    streams = FakeStreams(log)
    layers = list(model.model.layers)
    assert all(isinstance(layer.mlp, MoE) for layer in layers)
    saved = [(layer.mlp.dispatcher, getattr(layer.mlp, "dispatchers", None)) for layer in layers]
    with torch.inference_mode():
        plain = three_prompts(runner)
        expected_hidden = model(plain.input_ids, plain.positions, plain)
    hooks = []
    try:
        for index, layer in enumerate(layers):
            inner = layer.mlp.dispatcher
            assert isinstance(inner, LocalDispatcher)
            layer.mlp.dispatchers = [Recording(inner, m, index, streams) for m in (0, 1)]

            def hook(_module, args, index=index):
                log.append(("attention", args[2].num_tokens, index, streams.current))

            hooks.append(layer.self_attn.register_forward_pre_hook(hook))
        fb = three_prompts(runner)
        with torch.inference_mode():
            hidden, _ = forward_tbo(model, fb, overlap=StreamOverlap(streams))
    finally:
        for h in hooks:
            h.remove()
        for layer, (dispatcher, dispatchers) in zip(layers, saved, strict=True):
            layer.mlp.dispatcher = dispatcher
            if dispatchers is None:
                del layer.mlp.dispatchers
            else:
                layer.mlp.dispatchers = dispatchers
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-5)

    # Name the micro-batches by their token counts (8 and 7) in the attention events.
    log = [(e[0], {8: 0, 7: 1}[e[1]], *e[2:]) if e[0] == "attention" else e for e in log]
    calls = [e for e in log if e[0] not in ("record", "wait")]
    # Which stream runs what: attention and the expert-side receive on compute, every comm launch on comm.
    on = {"attention": "compute", "dispatch_finish": "compute"}
    for name, _m, _layer, stream in calls:
        assert stream == on.get(name, "comm"), (name, stream)
    # The launch order is the comm-stream schedule's (lead 1, a tick's comm stage first).
    expected = []
    for m, i in stream_schedule(["compute", "comm", "compute", "comm"] * len(layers)):
        layer, kind = divmod(i, 4)
        expected += [
            [("attention", m, layer)],
            [("dispatch_start", m, layer)],
            [("dispatch_finish", m, layer), ("combine_start", m, layer)],
            [("combine_finish", m, layer)],
        ][kind]
    assert [c[:3] for c in calls] == expected

    def position(call):
        return next(p for p, e in enumerate(log) if e[:3] == call)

    def recorded_after(p, stream):
        """The first event recorded on `stream` after log position p."""
        return next(e[2] for e in log[p + 1 :] if e[0] == "record" and e[1] == stream)

    def waits_between(start, end, stream):
        return {e[2] for e in log[start:end] if e[0] == "wait" and e[1] == stream}

    for m in (0, 1):
        for layer in range(len(layers)):
            attention = position(("attention", m, layer))
            dispatch = position(("dispatch_start", m, layer))
            receive = position(("dispatch_finish", m, layer))
            combine = position(("combine_start", m, layer))
            finish = position(("combine_finish", m, layer))
            # The dispatch waits on the event recorded after this micro-batch's attention + router stage...
            assert recorded_after(attention, "compute") in waits_between(attention, dispatch, "comm")
            # ... and the experts stage waits on the event recorded after the dispatch.
            assert recorded_after(dispatch, "comm") in waits_between(dispatch, receive, "compute")
            # The combine launch waits on the compute issued so far (the experts), from inside the stage.
            assert recorded_after(receive, "compute") in waits_between(receive, combine, "comm")
            # The combine stage waits on the event after the experts stage (shared experts included) ...
            assert recorded_after(combine, "compute") in waits_between(combine, finish, "comm")
            # ... and the next layer's attention (or the join) waits on the combine's event.
            combined = recorded_after(finish, "comm")
            end = position(("attention", m, layer + 1)) if layer + 1 < len(layers) else len(log)
            assert combined in waits_between(finish, end, "compute")
    # The compute stream gets the micro-batches' compute stages alternately (attention 0, attention 1,
    # experts 0, experts 1, ...): one micro-batch's experts, which wait for its dispatch, are never queued ahead
    # of the other's attention; and each dispatch is launched before the other micro-batch's next compute.
    compute = [c[1] for c in calls if c[0] in ("attention", "dispatch_finish")]
    assert compute == [0, 1] * (2 * len(layers))
    for layer in range(len(layers)):
        assert position(("dispatch_start", 1, layer)) < position(("dispatch_finish", 0, layer))
        assert position(("combine_finish", 0, layer)) < position(("dispatch_finish", 1, layer))
    # The join: the step ends with the compute stream waiting on the comm stream.
    assert log[-1][:2] == ("wait", "compute")


def test_without_streams_cpu_runs_the_stages_in_launch_order(model_and_runner):
    model, runner = model_and_runner
    overlap = make_overlap(model, torch.device("cpu"))
    assert type(overlap) is Overlap and overlap.mechanism == "none"
    with torch.inference_mode():
        hidden, _ = forward_tbo(model, three_prompts(runner))
        expected = model(
            three_prompts(runner).input_ids, three_prompts(runner).positions, three_prompts(runner)
        )
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert dispatcher_overlaps(model) == {"none"}  # LocalDispatcher


def test_mechanism_per_backend():
    assert choose_mechanism("cpu", {"comm_stream"})[0] == "none"
    assert choose_mechanism("cuda", {"comm_stream"})[0] == "comm_stream"  # a2a, symm
    assert choose_mechanism("cuda", {"recv_hook"})[0] == "recv_hook"  # DeepEP
    assert choose_mechanism("cuda", {"none"})[0] == "none"  # single rank
    assert choose_mechanism("cuda", {"comm_stream", "recv_hook"})[0] == "none"
    assert choose_mechanism("cuda", set())[0] == "none"
    from moefleet.engine.distributed.a2a import AllToAllDispatcher
    from moefleet.engine.distributed.deepep import DeepEPDispatcher
    from moefleet.engine.distributed.symm import SymmDispatcher

    assert AllToAllDispatcher.TBO_OVERLAP == SymmDispatcher.TBO_OVERLAP == "comm_stream"
    assert DeepEPDispatcher.TBO_OVERLAP == "recv_hook"


def test_tensors_in_walks_dataclasses_and_containers():
    from moefleet.engine.layers.moe import MoEStep

    a, b, c, d = (torch.zeros(1) for _ in range(4))
    step = MoEStep(a, a, b, c, pending=({"x": d}, [1, "s"]))
    assert [id(t) for t in tensors_in(step)] == [id(a), id(a), id(b), id(c), id(d)]
    assert list(tensors_in(None)) == [] and list(tensors_in(3)) == []
