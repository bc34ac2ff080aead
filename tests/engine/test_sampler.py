"""Sampler: greedy, top-k / top-p masks, temperature, per-request seeded reproducibility."""

import torch
from moefleet.engine.sampler import SamplingBatch, apply_top_k, apply_top_p, sample


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n, temperature=1.0, top_k=-1, top_p=1.0, generators=None) -> SamplingBatch:
    return SamplingBatch(
        [temperature] * n, [top_k] * n, [top_p] * n, generators or [gen(i) for i in range(n)]
    )


def test_greedy_is_argmax_with_torch_tie_breaking():
    logits = torch.randn(5, 50)
    logits[1, 7] = logits[1, 30] = logits[1].max() + 1  # a tie: torch.argmax picks the first
    tokens = sample(logits, SamplingBatch([0.0] * 5, [-1] * 5, [1.0] * 5, [None] * 5))
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[1] == 7


def test_greedy_rows_ignore_top_k_top_p_and_mix_with_sampled_rows():
    logits = torch.randn(3, 20)
    b = SamplingBatch([0.0, 1.0, 0.0], [5, 5, 5], [0.5, 0.5, 0.5], [None, gen(0), None])
    tokens = sample(logits, b)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 30)
    ks = torch.tensor([1, 3, 30, -1])
    masked = apply_top_k(logits, ks)
    for row, k in enumerate([1, 3, 30, 30]):
        kept = torch.isfinite(masked[row]).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(logits[row].topk(k).indices.tolist())
        assert torch.equal(masked[row][torch.isfinite(masked[row])], logits[row][torch.isfinite(masked[row])])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]] * 3)
    logits = probs.log()
    masked = apply_top_p(logits, torch.tensor([0.8, 0.81, 0.01]))
    kept = [torch.isfinite(row).nonzero().flatten().tolist() for row in masked]
    assert kept == [[1, 3], [1, 2, 3], [1]]


def test_sampling_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 40)
    allowed_k = set(logits[0].topk(4).indices.tolist())
    g = gen(1)
    for _ in range(200):
        assert sample(logits, batch(1, top_k=4, generators=[g]))[0] in allowed_k
    top1 = int(logits[0].argmax())
    for _ in range(50):
        assert sample(logits, batch(1, top_p=1e-6, generators=[g]))[0] == top1


def test_seed_reproducible_independent_of_batch():
    logits = torch.randn(4, 100)
    alone = [sample(logits[2:3], batch(1, generators=[gen(42)]))[0] for _ in range(3)]
    assert len(set(alone)) == 1
    # Same request (row 2, seed 42) among other rows with other seeds, sampled step by step.
    g_alone, g_batched = gen(42), gen(42)
    seq_alone, seq_batched = [], []
    for step in range(20):
        step_logits = torch.randn(4, 100, generator=gen(step))
        seq_alone.append(sample(step_logits[2:3], batch(1, generators=[g_alone]))[0])
        gens = [gen(1000 + step), gen(7), g_batched, gen(3)]
        seq_batched.append(sample(step_logits, batch(4, generators=gens))[2])
    assert seq_alone == seq_batched
    assert len(set(seq_alone)) > 1  # it really samples


def test_temperature_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 1.0, 2.0):
        g = gen(0)
        n = 4000
        # n rows drawing one after another from one generator: n independent draws.
        tokens = sample(logits.expand(n, 4), batch(n, temperature=temperature, generators=[g] * n))
        counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
        expected = (logits[0] / temperature).softmax(-1)
        # 4 sigma of a binomial proportion.
        tolerance = 4 * (expected * (1 - expected) / n).sqrt() + 1e-3
        assert ((counts / n - expected).abs() <= tolerance).all(), (temperature, counts / n, expected)
