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
