"""Scheduler states of disaggregation (hand-computed block counts) and the gateway's split decision."""

from __future__ import annotations

import pytest
from moefleet.engine.block_manager import BlockManager
from moefleet.engine.gateway.pd import splittable
from moefleet.engine.sampling_params import SamplingParams
from moefleet.engine.scheduler import KVCacheFullError, Scheduler
from moefleet.engine.sequence import Sequence, SequenceStatus


def _scheduler(num_blocks: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64)


def _seq(name: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def test_decode_reserves_the_prompts_blocks_and_resumes_decoding_after_the_kv_landed():
    sched = _scheduler()
    seq = _seq("a", 9)
    sched.reserve_for_kv(seq)
    assert seq.status is SequenceStatus.WAITING_FOR_KV and len(seq.block_table) == 3  # ceil(9 / 4)
    assert sched.schedule().is_empty  # never scheduled while waiting
    sched.resume_with_kv(seq)
    seq.append_token(99)
    out = sched.schedule()
    # One decode token at position 9, the prompt counted as cached.
    assert [(s.start, s.num_new_tokens, s.samples) for s in out.scheduled] == [(9, 1, True)]


def test_a_resumed_sequence_goes_before_one_that_is_mid_prompt():
    sched = _scheduler(num_blocks=32)
    long = _seq("long", 40, max_tokens=2)
    sched.add(long)
    sched.schedule()  # 16 of its 40 prompt tokens: mid-prompt
    arrived = _seq("b", 5)
    sched.reserve_for_kv(arrived)
    sched.resume_with_kv(arrived)
    assert [s.request_id for s in sched.running] == ["b", "long"]


def test_decode_refuses_a_prompt_with_no_room_and_aborts_free_parked_blocks():
    sched = _scheduler(num_blocks=4)
    first = _seq("a", 12)  # 3 of the 4 blocks
    sched.reserve_for_kv(first)
    with pytest.raises(KVCacheFullError, match="no room"):  # a valid request: 503 kv_cache_full, not 400
        sched.reserve_for_kv(_seq("b", 8))
    assert sched.abort("a") is first and sched.block_manager.num_free_blocks == 4


def test_prefill_parks_a_sent_sequence_with_its_blocks_until_finish_sent():
    sched = _scheduler()
    seq = _seq("a", 6)
    sched.add(seq)
    out = sched.schedule()
    sched.advance(out)
    seq.append_token(7)
    sched.park_sending(seq)
    assert seq.status is SequenceStatus.SENDING_KV and sched.block_manager.num_used_blocks == 2
    assert sched.schedule().is_empty
    sched.finish_sent(seq)
    assert sched.block_manager.num_used_blocks == 0 and not sched.sending_kv


@pytest.mark.parametrize(
    ("body", "split"),
    [
        ({"prompt": "x"}, True),
        ({"prompt": "x", "n": 1, "logprobs": None, "echo": False}, True),
        ({"prompt": "x", "n": 2}, False),
        ({"prompt": "x", "logprobs": 2}, True),
        ({"messages": [], "logprobs": True, "top_logprobs": 3}, True),
        ({"prompt": "x", "logprobs": 2, "echo": True}, False),
        ({"messages": [], "prompt_logprobs": 1}, False),
        ({"prompt": "x", "best_of": 2}, False),
        ({"messages": [], "response_format": {"type": "json_object"}}, False),
        ({"messages": [], "tools": [{"type": "function"}]}, False),
    ],
)
def test_which_requests_the_gateway_splits(body, split):
    assert splittable(body) is split
