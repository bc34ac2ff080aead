"""BlockManager: lazy block growth, free accounting, usage."""

import pytest
from moefleet.engine.block_manager import BlockManager
from moefleet.engine.sampling_params import SamplingParams
from moefleet.engine.sequence import Sequence


def make_seq(n: int) -> Sequence:
    return Sequence("r", list(range(n)), SamplingParams())


def test_allocate_grows_block_table_lazily():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(10)
    bm.allocate(seq, 3)
    assert len(seq.block_table) == 1
    bm.allocate(seq, 4)  # still fits in the first block
    assert len(seq.block_table) == 1
    bm.allocate(seq, 9)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(3 / 8)


def test_num_new_blocks_and_can_allocate():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(12)
    assert bm.num_new_blocks(seq, 5) == 2
    assert bm.can_allocate(seq, 8)
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="KV pool exhausted"):
        bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2  # a failed allocation takes nothing


def test_free_returns_blocks_and_forgets_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(4), make_seq(4)
    bm.allocate(a, 4)
    bm.allocate(b, 3)
    a.num_cached_tokens = 4
    assert bm.num_free_blocks == 0
    bm.free(a)
    assert a.block_table == [] and a.num_cached_tokens == 0
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    # Every block id is handed out again exactly once.
    c = make_seq(8)
    bm.allocate(c, 8)
    assert sorted(c.block_table) == [0, 1, 2, 3]


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)


def test_shared_blocks_are_freed_by_their_last_holder():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b, c = make_seq(9), make_seq(9), make_seq(9)
    bm.allocate(a, 9)  # 3 blocks
    bm.share(b, a.block_table[:2])
    bm.allocate(b, 9)  # one more of its own
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.num_used_blocks == 4 and [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert bm.num_used_blocks == 3  # the shared two stay with b
    bm.share(c, b.block_table[:1])
    bm.free(b)
    assert bm.num_used_blocks == 1 and bm.ref_count(c.block_table[0]) == 1
    bm.free(c)
    assert bm.num_free_blocks == 6


def test_share_refuses_free_blocks_and_non_empty_tables():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(4), make_seq(4)
    with pytest.raises(RuntimeError, match="free"):
        bm.share(a, [0])
    bm.allocate(a, 4)
    bm.allocate(b, 4)
    with pytest.raises(RuntimeError, match="empty block table"):
        bm.share(b, a.block_table)
