"""Routing: grouped top-k (DeepSeek) and softmax top-k (Qwen3) against slow, obviously-correct references."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.layers.router import (
    Router,
    RoutingConfig,
    grouped_topk,
    prepare_gates,
    softmax_topk,
)


def slow_grouped_topk(scores, bias, top_k, n_group, topk_group, renormalize, scale):
    """Token by token, in plain Python: pick groups by sum of their two best biased scores, then experts."""
    weights, ids = [], []
    num_experts = scores.shape[1]
    per_group = num_experts // n_group
    for t in range(scores.shape[0]):
        biased = [float(scores[t, e] + bias[e]) for e in range(num_experts)]
        group_score = []
        for g in range(n_group):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(members[0] + members[1])
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(num_experts) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:top_k]
        w = [float(scores[t, e]) for e in chosen]
        if renormalize:
            total = sum(w)
            w = [x / total for x in w]
        weights.append([x * scale for x in w])
        ids.append(chosen)
    return torch.tensor(weights), torch.tensor(ids)


def _sorted_by_id(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize(
    ("n_group", "topk_group", "top_k", "renormalize"), [(4, 2, 4, True), (8, 3, 6, False), (1, 1, 3, True)]
)
def test_grouped_topk_matches_slow_reference(n_group, topk_group, top_k, renormalize):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 32, generator=g)
    bias = torch.randn(32, generator=g) * 0.1
    weights, ids = grouped_topk(scores, bias, top_k, n_group, topk_group, renormalize, 2.5)
    ref_weights, ref_ids = slow_grouped_topk(scores, bias, top_k, n_group, topk_group, renormalize, 2.5)
    w, i = _sorted_by_id(weights, ids)
    rw, ri = _sorted_by_id(ref_weights, ref_ids)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw)


def test_grouped_topk_only_uses_chosen_groups():
    # Group 1 (experts 4..7) holds every high score: with topk_group=1 all picks must come from it.
    scores = torch.full((3, 16), 0.1)
    scores[:, 4:8] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    scores[:, 0] = 0.95  # best single expert, but its group's top-2 sum is lower
    _, ids = grouped_topk(scores, None, 2, 4, 1, True, 1.0)
    assert ((ids >= 4) & (ids < 8)).all()


def test_bias_changes_selection_not_weights():
    scores = torch.tensor([[0.9, 0.5, 0.4, 0.1]])
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])
    weights, ids = grouped_topk(scores, bias, 1, 1, 1, False, 1.0)
    assert ids.tolist() == [[3]]
    assert weights.tolist() == [[pytest.approx(0.1)]]


def test_softmax_topk_norm_and_not():
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    w, ids = softmax_topk(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(w, probs.gather(1, ids))
    assert (ids == probs.topk(2).indices).all()
    wn, _ = softmax_topk(logits, 2, renormalize=True)
    torch.testing.assert_close(wn.sum(-1), torch.ones(10))


def test_router_spreads_tokens_and_handles_empty_batch():
    router = Router(16, RoutingConfig(num_experts=8, top_k=2))
    torch.nn.init.normal_(router.weight)
    weights, ids = router(torch.randn(64, 16))
    assert len(set(ids.flatten().tolist())) > 4
    w0, i0 = router(torch.randn(0, 16))
    assert w0.shape == (0, 2) and i0.shape == (0, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 8, "top_k": 9}, "num_experts_per_tok"),
        ({"num_experts": 10, "top_k": 2, "n_group": 4, "topk_group": 1}, "not divisible by n_group"),
        ({"num_experts": 8, "top_k": 2, "n_group": 4, "topk_group": 5}, "topk_group"),
        ({"num_experts": 8, "top_k": 2, "scoring": "relu"}, "scoring_func"),
    ],
)
def test_routing_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**kwargs)


def test_bf16_gate_only_when_every_value_is_a_bf16_number():
    router = Router(64, RoutingConfig(num_experts=8, top_k=2, scoring="sigmoid", correction_bias=True))
    assert router.weight.dtype == torch.float32
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64).to(torch.bfloat16))  # as a bf16 checkpoint loads it
    assert router.bf16_gate() is None  # not prepared yet: the forward never decides (it would sync)
    prepare_gates(torch.nn.ModuleList([router]))
    gate = router.bf16_gate()
    assert gate is not None and gate.dtype == torch.bfloat16
    assert torch.equal(gate.float(), router.weight)
    with torch.no_grad():
        router.weight.copy_(router.weight.to(torch.bfloat16))  # in place: a new version, stale until prepared
    assert router.bf16_gate() is None
    router.prepare_gate()
    assert router.bf16_gate() is not None
    with torch.no_grad():
        router.weight[3, 5] += 1e-4  # no longer a bf16 number
    router.prepare_gate()
    assert router.bf16_gate() is None


def test_cpu_logits_stay_the_float32_gemm():
    router = Router(64, RoutingConfig(num_experts=8, top_k=2, scoring="sigmoid"))
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64).to(torch.bfloat16))
    hidden = torch.randn(5, 64).to(torch.bfloat16)
    expected = torch.nn.functional.linear(hidden.float(), router.weight)
    assert torch.equal(router.logits_float32(hidden), expected)
