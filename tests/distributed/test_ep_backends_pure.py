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
    requested="auto", world=2, device="cuda", deepep_ok=True, symm_ok=True, check=(True, "ok"), verified=None
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


def test_explicit_backends_and_bad_requests():
    assert _choose("a2a", device="cpu")[:2] == ("a2a", "requested")
    assert _choose("symm", verified=NONE_VERIFIED)[0] == "symm"  # explicit: the user's call
    with pytest.raises(ValueError, match="needs CUDA GPUs .* use --moe-backend a2a"):
        _choose("symm", device="cpu")
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
