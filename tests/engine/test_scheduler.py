"""Scheduler: chunked prefill, budgets, decode-first, preemption order, abort, add-time validation.

A deterministic fake model (next token = hash of all tokens so far) lets a run with a tiny KV pool (many
preemptions) be compared with a run where everything fits: recompute must not change any output.
"""

import random

import pytest
from moefleet.engine.block_manager import BlockManager
from moefleet.engine.sampling_params import SamplingParams
from moefleet.engine.scheduler import Scheduler, SchedulerOutput
from moefleet.engine.sequence import Sequence, SequenceStatus


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, max_model_len=256) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, max_model_len)


def make_seq(name: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(
        name, [(7 * i + len(name)) % 50 for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens)
    )


def fake_next_token(tokens: list[int]) -> int:
    return hash(tuple(tokens)) % 1000


def run_step(sched: Scheduler) -> SchedulerOutput:
    """schedule -> (fake) run -> postprocess, checking what the model would have been given."""
    out = sched.schedule()
    for s in out.scheduled:
        # The step continues exactly where the cache ends, and slots exist for every computed token.
        assert s.start == s.seq.num_cached_tokens
        assert len(s.seq.block_table) * sched.block_manager.block_size >= s.start + s.num_new_tokens
    sched.advance(out)
    for s in out.sampling:
        s.seq.append_token(fake_next_token(s.seq.token_ids))
        if s.seq.num_output_tokens == s.seq.params.max_tokens:
            s.seq.finish_reason = "length"
            sched.finish(s.seq)
    return out


def summary(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.seq.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]


def test_long_prompt_is_chunked_and_samples_only_when_fully_cached():
    sched = make_scheduler(budget=8)
    seq = make_seq("a", 20, max_tokens=2)
    sched.add(seq)
    assert summary(run_step(sched)) == [("a", 0, 8, False)]
    assert summary(run_step(sched)) == [("a", 8, 8, False)]
    out = run_step(sched)
    assert summary(out) == [("a", 16, 4, True)] and out.is_prefill
    assert seq.num_output_tokens == 1
    out = run_step(sched)
    assert summary(out) == [("a", 20, 1, True)] and not out.is_prefill
    assert seq.is_finished and sched.block_manager.num_free_blocks == 64


def test_budget_is_shared_fifo_and_decodes_come_first():
    sched = make_scheduler(budget=8)
    for name in ("a", "b", "c"):
        sched.add(make_seq(name, 5))
    assert summary(run_step(sched)) == [("a", 0, 5, True), ("b", 0, 3, False)]
    # a decodes first, then b finishes its prompt, then c gets what is left.
    assert summary(run_step(sched)) == [("a", 5, 1, True), ("b", 3, 2, True), ("c", 0, 5, True)]
    out = run_step(sched)
    assert summary(out) == [("a", 6, 1, True), ("b", 5, 1, True), ("c", 5, 1, True)]
    assert out.num_tokens == 3


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for name in ("a", "b", "c"):
        sched.add(make_seq(name, 3, max_tokens=2))
    out = run_step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]
    run_step(sched)  # a and b finish
    assert summary(run_step(sched)) == [("c", 0, 3, True)]


def test_preempts_newest_and_requeues_it_at_the_head():
    # 6 blocks of 4 slots; prompts of 8 tokens take 2 blocks each.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a, b, c = (make_seq(name, 8, max_tokens=6) for name in ("a", "b", "c"))
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    # Admission keeps one free block per running sequence, so c waits rather than fill the pool.
    assert [s.request_id for s in sched.running] == ["a", "b"] and sched.block_manager.num_free_blocks == 2
    sched.add(make_seq("d", 2))
    for _ in range(10):  # a and b take the last 2 blocks at slot 8; at slot 12 a needs one more
        out = run_step(sched)
        if out.preempted:
            break
    assert [s.request_id for s in out.preempted] == ["b"]
    assert summary(out) == [("a", 12, 1, True)]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_cached_tokens == 0
    assert [s.request_id for s in sched.waiting] == ["b", "c", "d"]  # preempted goes to the head
    # b resumes by recomputing prompt + outputs so far in one go, then samples.
    out = run_step(sched)
    assert summary(out)[0] == ("b", 0, 8 + 5, True)


def test_preempted_sequences_keep_arrival_order():
    sched = make_scheduler(num_blocks=5, block_size=2, budget=64, max_num_seqs=4)
    a, b, c = (make_seq(name, 1, max_tokens=7) for name in ("a", "b", "c"))
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)  # one block each, 2 left
    run_step(sched)  # slot 1 fits in the first block
    out = run_step(sched)  # slot 2: a and b take the last 2 blocks; c has none and is the newest
    assert [s.request_id for s in out.preempted] == ["c"] and summary(out)[-1][0] == "b"
    run_step(sched)
    out = run_step(sched)  # slot 4: a needs a block -> b, now the newest, goes
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


@pytest.mark.parametrize("seed", range(5))
def test_outputs_do_not_change_under_preemption_and_chunking(seed):
    rng = random.Random(seed)
    specs = [(f"r{i}", rng.randint(1, 30), rng.randint(1, 12)) for i in range(12)]

    def run(num_blocks, budget, max_num_seqs):
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=budget, max_num_seqs=max_num_seqs)
        seqs = [make_seq(*spec) for spec in specs]
        pending = list(seqs)
        steps = 0
        while pending or sched.num_unfinished:
            if pending and rng.random() < 0.5:
                sched.add(pending.pop(0))
            out = run_step(sched)
            assert out.num_tokens <= budget and len(sched.running) <= max_num_seqs
            steps += 1
            assert steps < 5000, "no progress"
        assert sched.block_manager.num_free_blocks == num_blocks
        return {s.request_id: s.output_token_ids for s in seqs}, sched.num_preemptions_total

    reference, none = run(num_blocks=1000, budget=4096, max_num_seqs=64)
    assert none == 0
    tight, preemptions = run(num_blocks=12, budget=7, max_num_seqs=5)
    assert preemptions > 0
    assert tight == reference
    for name, _, max_tokens in specs:
        assert len(reference[name]) == max_tokens


def test_abort_frees_blocks_immediately():
    sched = make_scheduler(budget=64)
    a, b = make_seq("a", 10), make_seq("b", 3)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    assert sched.block_manager.num_used_blocks == 3
    assert sched.abort("a") is a
    assert a.finish_reason == "abort" and a.is_finished and a.block_table == []
    assert sched.block_manager.num_used_blocks == 0
    assert sched.abort("b") is b and not sched.waiting
    assert sched.abort("missing") is None


def test_add_rejects_requests_that_cannot_complete():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=20)
    with pytest.raises(ValueError, match="longer than max_model_len"):
        sched.add(make_seq("a", 21))
    with pytest.raises(ValueError, match="lower max_tokens to at most 5"):
        sched.add(make_seq("b", 15, max_tokens=6))
    with pytest.raises(ValueError, match="needs 5 KV blocks but the pool has 4"):
        sched.add(make_seq("c", 12, max_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        sched.add(make_seq("d", 0))
    sched.add(make_seq("e", 12, max_tokens=5))  # 16 slots: exactly the pool
    assert sched.num_unfinished == 1


def run_step_with_kv_oracle(sched: Scheduler, kv: dict[int, tuple[int, int]]) -> SchedulerOutput:
    """run_step, plus a fake KV cache: each computed token writes (position, token) into its slot, and every
    step checks that the slots of all earlier positions of the sequence hold exactly its own tokens (shared
    blocks included: a sibling overwriting one, or a block freed too early and reused, is caught)."""
    bs = sched.block_manager.block_size
    out = sched.schedule()
    for s in out.scheduled:
        table = s.seq.block_table

        def slot(p: int, table: list[int] = table) -> int:
            return table[p // bs] * bs + p % bs

        for p in range(s.start):
            assert kv.get(slot(p)) == (p, s.seq.token_ids[p]), f"{s.seq!r}: stale KV at position {p}"
        for p in range(s.start, s.start + s.num_new_tokens):
            kv[slot(p)] = (p, s.seq.token_ids[p])
    sched.advance(out)
    for s in out.sampling:
        s.seq.append_token(fake_next_token(s.seq.token_ids + [s.seq.seq_id]))  # siblings diverge
        if s.seq.num_output_tokens == s.seq.params.max_tokens:
            s.seq.finish_reason = "length"
            sched.finish(s.seq)
    return out


def shared_family(name: str, prompt_len: int, n: int, max_tokens: int) -> list[Sequence]:
    prompt = [(7 * i + len(name)) % 50 for i in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, prefix_share_key=name)
    return [Sequence(f"{name}-{i}", prompt, params) for i in range(n)]


def test_siblings_share_full_prompt_blocks_and_compute_only_the_rest():
    sched = make_scheduler(num_blocks=64, block_size=4, budget=64)
    kv: dict[int, tuple[int, int]] = {}
    a0, a1, a2 = shared_family("a", 10, 3, 3)
    for seq in (a0, a1, a2):
        sched.add(seq)
    out = run_step_with_kv_oracle(sched, kv)
    assert summary(out) == [("a-0", 0, 10, True)]  # the siblings wait for the prompt's blocks
    out = run_step_with_kv_oracle(sched, kv)
    # 10 tokens = 2 full blocks + 2: each sibling computes only tokens 8 and 9.
    assert summary(out) == [("a-0", 10, 1, True), ("a-1", 8, 2, True), ("a-2", 8, 2, True)]
    assert a1.block_table[:2] == a0.block_table[:2] == a2.block_table[:2]
    assert len({a0.block_table[2], a1.block_table[2], a2.block_table[2]}) == 3
    assert sched.block_manager.num_used_blocks == 2 + 3
    while sched.num_unfinished:
        run_step_with_kv_oracle(sched, kv)
    assert sched.block_manager.num_free_blocks == 64


def test_sharing_survives_preemption_and_chunking():
    """Many families of siblings in a pool so small that they are preempted: the KV oracle holds at every
    step, every choice gets its tokens, and every block comes back."""
    preemptions = 0
    for seed in range(6):
        rng = random.Random(seed)
        families = [
            shared_family(f"f{i}", rng.randint(1, 18), rng.randint(1, 3), rng.randint(1, 8)) for i in range(8)
        ]
        sched = make_scheduler(num_blocks=10, block_size=4, budget=9, max_num_seqs=6)
        kv: dict[int, tuple[int, int]] = {}
        pending = list(families)
        steps = 0
        while pending or sched.num_unfinished:
            if pending and rng.random() < 0.5:
                for seq in pending.pop(0):
                    sched.add(seq)
            run_step_with_kv_oracle(sched, kv)
            steps += 1
            assert steps < 5000, "no progress"
        preemptions += sched.num_preemptions_total
        assert sched.block_manager.num_free_blocks == 10
        for family in families:
            for seq in family:
                assert seq.num_output_tokens == seq.params.max_tokens
    assert preemptions > 0
