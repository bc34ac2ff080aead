"""Pure parts of the expert-parallel backends, on CPU: the `--moe-backend` choice, DeepEP's per-step mode and
limits, and the symmetric-memory dispatcher's device-side index math + the Triton row reorder (interpreter)
composed with an emulated all_to_all_vdev (rows of source s for rank r = s's send rows [offset, offset+split),
the operation's documented contract), checked against the dense MoE formula on skewed, empty, padded and
maximal routings."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.distributed import deepep
from moefleet.engine.distributed.backends import choose_backend, symm_reservation
from moefleet.engine.distributed.symm import (
    a2a_row_bytes,
    capacity,
    combine_hits,
    combine_hits_kernel,
    id_columns,
    plan_expert_major,
    plan_send,
    workspace_bytes,
)
from moefleet.engine.kernels.row_copy import copy_rows, copy_rows_reference

ALL_VERIFIED = {"symm": True, "deepep": True}
NONE_VERIFIED = {"symm": False, "deepep": False}


# ---- backend choice ----------------------------------------------------------------------------------


def _choose(
    requested="auto",
    world=2,
    device="cuda",
    deepep_ok=True,
    symm_ok=True,
    check=(True, "ok"),
    verified=None,
    nvlink_ok=False,
):
    calls = []

    def self_check():
        calls.append(1)
        return check

    chosen, why = choose_backend(
        requested,
        world,
        device,
        deepep_importable=deepep_ok,
        symm_usable=symm_ok,
        deepep_self_check=self_check,
        verified=ALL_VERIFIED if verified is None else verified,
        nvlink_usable=nvlink_ok,
    )
    return chosen, why, len(calls)


def test_auto_prefers_deepep_when_importable_and_self_check_passes():
    assert _choose()[:1] == ("deepep",)
    chosen, why, calls = _choose(check=(False, "relative error 3"))
    assert (chosen, calls) == ("a2a", 1) and "self-check failed (relative error 3)" in why
    assert "symm: DeepEP already holds NVSHMEM here" in why  # the two cannot share one process


def test_auto_falls_back_symm_then_a2a():
    chosen, why, calls = _choose(deepep_ok=False)
    assert (chosen, calls) == ("symm", 0) and "deep_ep is not installed" in why
    chosen, why, _ = _choose(deepep_ok=False, symm_ok=False)
    assert chosen == "a2a" and "no NVSHMEM" in why
    assert _choose(device="cpu")[0] == "a2a"
    assert _choose(world=1)[0] == "local"


def test_auto_never_picks_an_unverified_backend():
    chosen, why, calls = _choose(verified=NONE_VERIFIED)
    assert (chosen, calls) == ("a2a", 0)
    assert "deepep: not verified on GPUs yet" in why and "symm: not verified on GPUs yet" in why
    assert _choose(verified={"symm": True, "deepep": False})[0] == "symm"
    # nvlink: after deepep, before symm, once verified and only within one node
    assert _choose(deepep_ok=False, nvlink_ok=True, verified={"symm": True})[0] == "symm"
    chosen, why, _ = _choose(deepep_ok=False, nvlink_ok=True, verified={"symm": True, "nvlink": True})
    assert chosen == "nvlink" and "deep_ep is not installed" in why
    chosen, why, _ = _choose(deepep_ok=False, nvlink_ok=False, verified={"symm": True, "nvlink": True})
    assert chosen == "symm" and "nvlink: the group is not one node's GPUs" in why
    assert _choose(nvlink_ok=True, verified={"deepep": True, "nvlink": True})[0] == "deepep"


def test_cli_choices_are_the_backends_a_user_may_request():
    from moefleet.engine.cli import MOE_BACKEND_CHOICES
    from moefleet.engine.distributed.backends import BACKENDS, CLI_CHOICES

    assert MOE_BACKEND_CHOICES == CLI_CHOICES
    assert set(CLI_CHOICES) == set(BACKENDS) - {"local"}


def test_explicit_backends_and_bad_requests():
    assert _choose("a2a", device="cpu")[:2] == ("a2a", "requested")
    assert _choose("symm", verified=NONE_VERIFIED)[0] == "symm"  # explicit: the user's call
    with pytest.raises(ValueError, match="needs CUDA GPUs .* use --moe-backend a2a"):
        _choose("symm", device="cpu")
    assert _choose("nvlink", verified=NONE_VERIFIED)[:2] == ("nvlink", "requested")
    with pytest.raises(ValueError, match="'nvlink' needs CUDA GPUs .* use --moe-backend a2a"):
        _choose("nvlink", device="cpu")
    with pytest.raises(ValueError, match="must be one of"):
        _choose("nvshmem")
    with pytest.raises(ValueError, match="use --moe-backend a2a"):
        _choose("local", world=2)


def test_symm_reserves_at_start_up_with_the_engine_dtype_name():
    cuda1 = torch.device("cuda", 1)
    assert symm_reservation(8, "bfloat16", cuda1, 2) == (8, torch.bfloat16, cuda1, 2)
    assert symm_reservation(8, torch.float32, cuda1, 1) == (8, torch.float32, cuda1, 1)
    assert symm_reservation(0, "bfloat16", cuda1, 1) is None  # top-k unknown: allocate on first dispatch
    assert symm_reservation(8, "float32", torch.device("cpu"), 1) is None
    with pytest.raises(ValueError, match="explicit CUDA device index"):
        symm_reservation(8, "float32", torch.device("cuda"), 1)


# ---- DeepEP: per-step kernels and limits ----------------------------------------------------------------


def test_deepep_mode_follows_the_step():
    assert deepep.pick_mode("auto", False, 7168) == "low_latency"
    assert deepep.pick_mode("auto", True, 7168) == "normal"
    assert deepep.pick_mode("auto", None, 7168) == "normal"  # unknown mode: the safe kernels
    assert deepep.pick_mode("auto", False, 64) == "normal"  # no low-latency kernels for this width
    assert deepep.pick_mode("normal", False, 7168) == "normal"
    with pytest.raises(ValueError, match="hidden sizes .* the model has 64"):
        deepep.pick_mode("low_latency", False, 64)
    with pytest.raises(ValueError, match="must be one of"):
        deepep.pick_mode("fast", False, 7168)
    deepep.check_ll_tokens(256, 256)
    with pytest.raises(ValueError, match="300 tokens .* holds 256 .* lower --max-num-seqs"):
        deepep.check_ll_tokens(300, 256)


# ---- symm: capacity, row reorder kernel, index math end to end ------------------------------------------


def test_capacity_holds_the_worst_case():
    cap = capacity(256, 8, 2, 7168, torch.bfloat16)
    # D + 8 id columns = 14352 bytes, padded to a multiple of 64 (and of 32 blocks per peer): 14400
    assert (cap.send_rows, cap.recv_rows, cap.width, cap.back_width) == (2048, 4096, 7200, 7168)
    assert (cap.send_alloc_rows, cap.back_alloc_rows) == (2048, 4096)  # already >= 4 MiB
    assert id_columns(torch.float32) == 4
    assert workspace_bytes(cap, torch.bfloat16) == ((2048 + 4096) * 7200 + (4096 + 2048) * 7168) * 2
    tiny = capacity(16, 3, 2, 64, torch.float32)  # 68 floats -> 320 bytes; inputs padded to 4 MiB
    assert (tiny.width, tiny.back_width, tiny.send_alloc_rows, tiny.back_alloc_rows) == (80, 64, 13108, 16384)
    assert a2a_row_bytes(100, 3) == 6720  # lcm(64, 21 blocks per peer within a node, 5 across nodes)
    with pytest.raises(ValueError, match="positive sizes"):
        capacity(0, 8, 2, 7168, torch.bfloat16)


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("n_valid", [0, 3, 7])
def test_copy_rows_matches_reference(scatter, n_valid):
    gen = torch.Generator().manual_seed(n_valid)
    src = torch.randn(7, 5 if scatter else 9, generator=gen)
    dst = torch.randn(7, 9 if scatter else 5, generator=gen)
    index = torch.randperm(7, generator=gen)
    expected = copy_rows_reference(src, dst, index, n_valid, scatter)
    got = copy_rows(src, dst.clone(), index, torch.tensor([n_valid]), scatter)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _emulated_all_to_all_vdev(sends: list[torch.Tensor], splits: list[torch.Tensor], out_rows: int):
    """Reference of torch.ops.symm_mem.all_to_all_vdev for W ranks in one process: rank r receives, in source
    order, source s's rows [sum(splits_s[:r]), + splits_s[r]); returns (outputs, out_splits per rank)."""
    world = len(sends)
    outs, out_splits = [], []
    for r in range(world):
        rows, counts = [], []
        for s in range(world):
            start = int(splits[s][:r].sum())
            count = int(splits[s][r])
            rows.append(sends[s][start : start + count])
            counts.append(count)
        got = torch.cat(rows)
        out = torch.full((out_rows, sends[0].shape[1]), float("nan"), dtype=sends[0].dtype)
        out[: got.shape[0]] = got
        outs.append(out)
        out_splits.append(torch.tensor(counts, dtype=torch.int64))
    return outs, out_splits


def _routing(kind: str, world: int, tokens: int, top_k: int, experts: int, gen: torch.Generator):
    ids = []
    for rank in range(world):
        t = 0 if kind == "empty" and rank == 0 else tokens
        r = (
            torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(t)])
            if t
            else torch.zeros(0, top_k, dtype=torch.long)
        )
        if kind == "skewed" and t:
            r[:, 0] = 0  # every token's first hit on expert 0
        if kind == "maximal" and t:
            r = (
                torch.stack([torch.randperm(experts // world, generator=gen)[:top_k] for _ in range(t)])
                + experts
                - experts // world
            )
        if kind == "padded" and t:
            r[::2, -1] = -1
        ids.append(r)
    return ids


@pytest.mark.parametrize("kind", ["random", "skewed", "empty", "maximal", "padded"])
def test_symm_index_math_round_trip_equals_dense_moe(kind):
    world, tokens, top_k, experts, hidden = 2, 5, 3, 8, 6
    num_local = experts // world
    gen = torch.Generator().manual_seed(7)
    ids = _routing(kind, world, tokens, top_k, experts, gen)
    xs = [torch.randn(i.shape[0], hidden, generator=gen) for i in ids]
    ws = [torch.rand(i.shape, generator=gen) for i in ids]
    cap = capacity(tokens, top_k, world, hidden, torch.float32)
    # dispatch: send buffers with the local id packed after the hidden columns
    plans, sends = [], []
    for x, i in zip(xs, ids, strict=True):
        plan = plan_send(i, experts, world)
        send = torch.zeros(cap.send_alloc_rows, cap.width)
        if i.numel():
            copy_rows(x, send, plan.order // top_k, plan.num_valid)
            send.view(torch.int32)[: i.numel(), hidden] = plan.local_ids.to(torch.int32)
        plans.append(plan)
        sends.append(send)
    recvs, recv_splits = _emulated_all_to_all_vdev(sends, [p.splits for p in plans], cap.recv_rows)
    # receive: expert-major reorder, stand-in experts (expert g scales rows by 1 + g / 8), scatter back
    backs = []
    for rank in range(world):
        recv_ids = recvs[rank].view(torch.int32)[:, hidden]
        major = plan_expert_major(recv_ids, recv_splits[rank], num_local)
        grouped = torch.full((cap.recv_rows, hidden), float("nan"))
        copy_rows(recvs[rank], grouped, major.order, major.num_valid)
        counts = major.counts.long()
        n = int(counts.sum())
        assert n == int(recv_splits[rank].sum())
        expert = torch.repeat_interleave(torch.arange(num_local), counts) + rank * num_local
        out = torch.full_like(grouped, float("nan"))
        out[:n] = grouped[:n] * (1 + expert.float() / 8)[:, None]
        back = torch.full((cap.back_alloc_rows, cap.back_width), float("nan"))
        copy_rows(out, back, major.order, major.num_valid, scatter=True)
        backs.append(back)
    returned, _ = _emulated_all_to_all_vdev(backs, recv_splits, cap.send_rows)
    for rank in range(world):
        got = combine_hits(returned[rank], plans[rank].order, ids[rank], ws[rank], hidden)
        i, w, x = ids[rank], ws[rank], xs[rank]
        scale = torch.where(i >= 0, 1 + i.float() / 8, torch.zeros_like(w))
        expected = (x[:, None, :] * (w * scale)[..., None]).sum(1)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, expected)
        # what CUDA runs: the gather-reduce kernel (interpreted here), stale NaN rows of padding hits skipped
        fused = combine_hits_kernel(returned[rank], plans[rank].order, ids[rank], ws[rank], hidden)
        assert not torch.isnan(fused).any()
        torch.testing.assert_close(fused, expected)


# ---- DeepEP dispatcher on CPU over a one-rank stand-in for deep_ep.Buffer ------------------------------


class OneRankBuffer:
    """deep_ep.Buffer's documented V1 contract for a group of ONE rank (every expert local), on CPU: normal
    `dispatch` hands each token back with its (local = global) expert ids and weights, `combine` sums across
    ranks (one: the identity); `low_latency_dispatch` fills the masked FP8 layout [E, max_tokens, D] with
    per-128-column scales, `low_latency_combine` applies the top-k weights. Every kernel call is logged."""

    calls: list[str] = []

    class _Config:
        def get_nvl_buffer_size_hint(self, hidden_bytes, world):
            return 0

        def get_rdma_buffer_size_hint(self, hidden_bytes, world):
            return 0

    @classmethod
    def get_dispatch_config(cls, world):
        return cls._Config()

    get_combine_config = get_dispatch_config

    @staticmethod
    def get_low_latency_rdma_size_hint(max_tokens, hidden, world, experts):
        return 0

    def __init__(self, group, nvl_bytes, rdma_bytes, low_latency_mode, num_qps_per_rank):
        self.low_latency_mode = low_latency_mode

    def get_dispatch_layout(self, topk_idx, num_experts):
        self.calls.append("get_dispatch_layout")
        return None, None, None, None, None

    def dispatch(self, x, *, topk_idx, topk_weights, **layout):
        self.calls.append("dispatch")
        assert topk_weights.dtype == torch.float32  # DeepEP's contract
        return x, topk_idx, topk_weights, None, "normal-handle", None

    def combine(self, x, handle):
        self.calls.append("combine")
        assert handle == "normal-handle"
        return x, None, None

    def clean_low_latency_buffer(self, max_tokens, hidden, experts):
        self.calls.append("clean_low_latency_buffer")

    def low_latency_dispatch(self, x, topk_idx, max_tokens, num_experts, use_fp8, return_recv_hook):
        self.calls.append("low_latency_dispatch")
        assert use_fp8 and return_recv_hook and self.low_latency_mode
        packed = torch.zeros(num_experts, max_tokens, x.shape[1])
        counts = torch.zeros(num_experts, dtype=torch.int32)
        slots = {}
        for t, k in ((t, k) for t in range(topk_idx.shape[0]) for k in range(topk_idx.shape[1])):
            e = int(topk_idx[t, k])
            if e >= 0:
                slots[(t, k)] = (e, int(counts[e]))
                packed[e, counts[e]] = x[t].float()
                counts[e] += 1
        scales = torch.ones(num_experts, max_tokens, x.shape[1] // 128)
        return (
            (packed.to(torch.float8_e4m3fn), scales),
            counts,
            slots,
            None,
            lambda: self.calls.append("hook"),
        )

    def low_latency_combine(self, out, topk_idx, topk_weights, slots, return_recv_hook):
        self.calls.append("low_latency_combine")
        combined = torch.zeros(topk_idx.shape[0], out.shape[2])
        for (t, k), (e, row) in slots.items():
            combined[t] += topk_weights[t, k] * out[e, row].float()
        return combined.to(torch.bfloat16), None, lambda: self.calls.append("hook")


class _OneRankGroup:
    group_name = "one-rank-test-group"

    def size(self):
        return 1


@pytest.fixture
def one_rank_deepep(monkeypatch):
    monkeypatch.setattr(deepep, "_import_buffer", lambda: OneRankBuffer)
    monkeypatch.setattr(deepep, "_BUFFERS", {})
    monkeypatch.setattr(OneRankBuffer, "calls", [])
    return OneRankBuffer.calls


def _tokens(seed, tokens=6, hidden=2048, experts=4, top_k=2):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randint(-4, 5, (tokens, hidden), generator=gen) / 4).to(torch.bfloat16)  # exact in e4m3
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[1, 1] = -1  # a padded hit
    w = torch.rand(tokens, top_k, generator=gen)
    return x, ids, w


def _dense(x, ids, w):
    """sum_k w * (1 + e / 8) * x over the valid hits (the stand-in experts' formula), float64."""
    scale = torch.where(ids >= 0, 1 + ids.double() / 8, torch.zeros_like(ids, dtype=torch.float64))
    return (x.double()[:, None, :] * (w.double() * scale)[..., None]).sum(1)


def test_deepep_two_micro_batches_of_different_modes_use_their_own_kernels(one_rank_deepep):
    """Two dispatches alive at once (one dispatcher per micro-batch, as TBO has): the prefill one runs the
    normal kernels (weights applied and hits summed locally by the shared `unpermute_and_reduce`), the
    decode one the low-latency kernels; both equal the dense formula. The mode comes only from the
    `is_prefill` each dispatch is given."""
    calls = one_rank_deepep
    group = _OneRankGroup()
    prefill_d, decode_d = (deepep.DeepEPDispatcher(group, 4, 2048, max_tokens_per_rank=16) for _ in range(2))
    assert prefill_d.shared is decode_d.shared  # one Buffer per process, held by both dispatchers
    (xa, ia, wa), (xb, ib, wb) = _tokens(1), _tokens(2)
    pending_a = prefill_d.dispatch_start(xa, ia, wa, is_prefill=True)
    pending_b = decode_d.dispatch_start(xb, ib, wb, is_prefill=False)
    assert calls == ["get_dispatch_layout", "dispatch", "clean_low_latency_buffer", "low_latency_dispatch"]
    outs = []
    for d, pending in ((prefill_d, pending_a), (decode_d, pending_b)):
        got = d.dispatch_finish(pending)
        assert got.counts is not None
        if d is decode_d:  # low-latency: the FP8 rows and their per-128-column scales, not dequantised
            assert got.hidden.dtype == torch.float8_e4m3fn and got.scales is not None
            assert got.scales.shape == (*got.hidden.shape[:2], got.hidden.shape[2] // 128)
            assert got.expected_rows == int(ib.numel())
        else:
            assert got.scales is None
        expert_out = deepep._stand_in_experts(got.real_rows(), got.counts, 0)
        outs.append(d.combine_finish(d.combine_start(expert_out, got)))
    assert calls[4:] == ["combine", "hook", "low_latency_combine", "hook"]
    for out, (x, ids, w) in zip(outs, ((xa, ia, wa), (xb, ib, wb)), strict=True):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), _dense(x, ids, w), rtol=1e-2, atol=1e-2)
    calls.clear()  # unknown mode (None): the safe normal kernels
    decode_d.dispatch_start(xb, ib, wb)
    assert calls == ["get_dispatch_layout", "dispatch"]


def test_deepep_normal_combine_reduces_like_the_formula_in_float32():
    """`reduce_received` (DeepEP normal mode, before its cross-rank combine) on bf16 outputs: hits grouped by
    expert on the device path, padding rows with garbage (NaN) contribute nothing, sums in float32."""
    from moefleet.engine.layers.token_dispatch import permute_by_expert_on_device

    recv_idx = torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0]])  # M = 4 received tokens, 2 local experts
    recv_w = torch.tensor([[0.5, 0.9], [0.25, 0.75], [0.3, 0.3], [1.0, 2.0]])
    order, token_index, counts, valid = permute_by_expert_on_device(recv_idx, 2)
    rows = torch.arange(1, 9, dtype=torch.float32)[:, None].expand(8, 3).to(torch.bfloat16).clone()
    rows[~valid] = float("nan")  # padding rows' outputs are undefined
    handle = deepep._NormalHandle(None, order, valid, recv_w, 4)
    got = deepep.reduce_received(rows, handle)
    # By hand: sorted hits (expert 0: t1k0, t3k1; expert 1: t0k0, t1k1, t3k0; then 3 padding) carry rows 1..5.
    expected = torch.tensor([[0.5 * 3], [0.25 * 1 + 0.75 * 4], [0.0], [2.0 * 2 + 1.0 * 5]]).expand(4, 3)
    assert got.dtype == torch.bfloat16 and counts.tolist() == [2, 3]
    torch.testing.assert_close(got.float(), expected)
