"""permute_by_expert / unpermute_and_reduce and LocalDispatcher against a dense reference."""

from __future__ import annotations

import torch
from moefleet.engine.layers.token_dispatch import LocalDispatcher, permute_by_expert, unpermute_and_reduce


def test_permute_groups_by_expert_and_round_trips():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (20, 3), generator=g)
    hidden = torch.randn(20, 8, generator=g)
    order, token_index, counts = permute_by_expert(ids, 6)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=6).tolist()
    sorted_ids = ids.flatten()[order]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()
    # Identity "experts" with weights 1 sum each token's K copies: K * hidden.
    out = unpermute_and_reduce(hidden[token_index], order, torch.ones(20, 3), 20)
    torch.testing.assert_close(out, 3 * hidden)


def test_padding_ids_are_dropped():
    ids = torch.tensor([[0, -1], [1, 1]])
    order, token_index, counts = permute_by_expert(ids, 2)
    assert counts.tolist() == [1, 2]
    assert token_index.tolist() == [0, 1, 1]


def test_local_dispatcher_matches_dense_moe():
    g = torch.Generator().manual_seed(1)
    num_tokens, num_experts, dim, top_k = 12, 4, 6, 2
    hidden = torch.randn(num_tokens, dim, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    scale = torch.arange(1, num_experts + 1, dtype=torch.float32)  # expert e multiplies by e + 1
    dispatcher = LocalDispatcher(num_experts)
    dispatched = dispatcher.dispatch_finish(dispatcher.dispatch_start(hidden, ids, weights))
    expert_of_row = torch.repeat_interleave(
        torch.arange(num_experts), torch.tensor(dispatched.tokens_per_expert)
    )
    out = dispatcher.combine_finish(
        dispatcher.combine_start(dispatched.hidden * scale[expert_of_row, None], dispatched)
    )
    expected = sum(weights[:, k, None] * scale[ids[:, k], None] * hidden for k in range(top_k))
    torch.testing.assert_close(out, expected)


def test_zero_tokens():
    dispatcher = LocalDispatcher(4)
    dispatched = dispatcher.dispatch_finish(
        dispatcher.dispatch_start(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    )
    assert dispatched.hidden.shape == (0, 8) and dispatched.tokens_per_expert == [0, 0, 0, 0]
    out = dispatcher.combine_finish(dispatcher.combine_start(dispatched.hidden, dispatched))
    assert out.shape == (0, 8)


def test_device_permutation_matches_the_host_one_and_padding_hits_add_nothing():
    """The sync-free (CUDA) permutation keeps padding hits (ids < 0) sorted last; counts and the valid rows
    equal the host permutation's, and combine ignores whatever the experts wrote for padding rows."""
    from moefleet.engine.layers.token_dispatch import (
        DispatchedTokens,
        LocalDispatcher,
        _LocalHandle,
        permute_by_expert,
        permute_by_expert_on_device,
    )

    torch.manual_seed(0)
    ids = torch.tensor([[2, 0], [1, -1], [0, 2], [-1, -1], [1, 1]])
    weights = torch.rand(5, 2)
    order, token_index, counts, valid = permute_by_expert_on_device(ids, 3)
    host_order, host_token_index, host_counts = permute_by_expert(ids, 3)
    assert counts.tolist() == host_counts.tolist() == [2, 3, 2]
    n = int(counts.sum())
    assert torch.equal(order[:n], host_order) and torch.equal(token_index[:n], host_token_index)
    assert valid.tolist() == [True] * n + [False] * (10 - n)
    hidden = torch.randn(5, 4)
    sorted_rows = hidden[token_index]
    outputs = sorted_rows * 3.0
    outputs[n:] = float("nan")  # what a kernel may leave in padding rows
    dispatcher = LocalDispatcher(3)
    device_path = dispatcher.combine_start(
        outputs, DispatchedTokens(sorted_rows, None, _LocalHandle(order, weights, 5, valid), counts=counts)
    )
    host_path = dispatcher.combine_start(
        outputs[:n], DispatchedTokens(sorted_rows[:n], [2, 3, 2], _LocalHandle(host_order, weights, 5))
    )
    torch.testing.assert_close(device_path, host_path)
    expected = torch.zeros(5, 4)  # from the definition: sum over valid hits of weight * 3 * hidden
    for t in range(5):
        for k in range(2):
            if ids[t, k] >= 0:
                expected[t] += weights[t, k] * 3.0 * hidden[t]
    torch.testing.assert_close(device_path, expected)
