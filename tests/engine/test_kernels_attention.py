"""The Triton attention kernels (engine/kernels) against the slow torch references written from the formula,
run on CPU under Triton's interpreter (TRITON_INTERPRET=1) on tiny random shapes.

Tolerance: float32 inputs, atol = rtol = 1e-4 (both sides accumulate in fp32; the kernels use exact fp32 dots
and an online base-2 softmax, so differences are rounding only, ~1e-6 seen). The GPU variant with bf16 and
long contexts is tests/gpu/test_attention_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels.attention_config import DecodeConfig
from moefleet.engine.kernels.attention_reference import (
    mla_decode_ref,
    paged_decode_ref,
    paged_prefill_ref,
    varlen_prefill_ref,
)

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, checked to run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
    on machines without CUDA before anything imports triton; on a GPU machine the GPU module tests them)."""
    from moefleet.engine.kernels import mla_decode, paged_attention
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(paged_attention._paged_decode_split_kernel, InterpretedFunction):
        pytest.skip("Triton kernels are compiled here (TRITON_INTERPRET unset): tests/gpu covers them")
    assert isinstance(paged_attention._prefill_kernel, InterpretedFunction)
    assert isinstance(mla_decode._mla_decode_split_kernel, InterpretedFunction)
    return paged_attention, mla_decode


def _block_tables(lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Shuffled, non-contiguous pages per sequence; unused entries -1."""
    need = [-(-n // block_size) for n in lens]
    width = max([*need, 1]) + 1
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    assert sum(need) <= num_blocks
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    return table


def _paged_cache(num_blocks, block_size, kv_heads, dk, dv, gen):
    if dk == dv:  # strided views of one [2, N, bs, Hk, D] tensor, as the engine allocates it
        kv = torch.randn(2, num_blocks, block_size, kv_heads, dk, generator=gen)
        return kv[0], kv[1]
    k = torch.randn(num_blocks, block_size, kv_heads, dk, generator=gen)
    v = torch.randn(num_blocks, block_size, kv_heads, dv, generator=gen)
    return k, v


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "heads,kv_heads,block_size,num_splits",
    [(4, 4, 16, None), (4, 1, 16, 4), (6, 2, 32, 1)],
    ids=["mha-auto-splits", "gqa4-splits-gt-needed", "gqa3-bs32-one-split"],
)
def test_paged_decode_matches_reference(kernels, heads, kv_heads, block_size, num_splits):
    paged, _ = kernels
    gen = torch.Generator().manual_seed(1)
    lens = [1, 17, 50]  # one token; not multiples of the page size
    k_cache, v_cache = _paged_cache(16, block_size, kv_heads, 16, 16, gen)
    tables = _block_tables(lens, block_size, 16, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), heads, 16, generator=gen)
    got = paged.paged_decode(q, k_cache, v_cache, tables, seq_lens, 0.25, num_splits=num_splits)
    _close(got, paged_decode_ref(q, k_cache, v_cache, tables, seq_lens, 0.25))


@pytest.mark.parametrize(
    "num_splits", [1, 3]
)  # one split writes the output itself; more go through the reduce
def test_paged_decode_sinks_window_dk_ne_dv_into_out(kernels, num_splits):
    paged, _ = kernels
    gen = torch.Generator().manual_seed(2)
    lens = [45, 3, 0]  # the last row is a padded (graph-bucket) row with no keys: its output is zero
    k_cache, v_cache = _paged_cache(12, 16, 2, 32, 16, gen)
    tables = _block_tables(lens, 16, 12, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 4, 32, generator=gen)
    sinks = torch.randn(4, generator=gen)
    out = torch.full((3, 4, 16), float("nan"))
    got = paged.paged_decode(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        0.2,
        sinks=sinks,
        sliding_window=20,
        num_splits=num_splits,
        out=out,
    )
    assert got.data_ptr() == out.data_ptr()
    expected = paged_decode_ref(q, k_cache, v_cache, tables, seq_lens, 0.2, sinks=sinks, sliding_window=20)
    _close(got, expected)
    assert torch.count_nonzero(got[2]) == 0
    # the window really cuts: without it the answer differs
    assert not torch.allclose(
        expected, paged_decode_ref(q, k_cache, v_cache, tables, seq_lens, 0.2, sinks=sinks)
    )


def test_paged_decode_empty_batch_and_bad_input(kernels):
    paged, _ = kernels
    k_cache = torch.zeros(4, 16, 2, 8)
    empty = paged.paged_decode(
        torch.zeros(0, 4, 8),
        k_cache,
        k_cache,
        torch.zeros(0, 2, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        1.0,
    )
    assert empty.shape == (0, 4, 8)
    with pytest.raises(ValueError, match="power of two"):
        paged.paged_decode(
            torch.zeros(1, 4, 8), torch.zeros(4, 8, 2, 8), torch.zeros(4, 8, 2, 8),
            torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged.paged_decode(
            torch.zeros(1, 3, 8), k_cache, k_cache, torch.zeros(1, 2, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 1.0,
        )  # fmt: skip


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


def test_paged_prefill_chunked_with_cached_history(kernels):
    paged, _ = kernels
    gen = torch.Generator().manual_seed(3)
    q_lens = [20, 0, 1, 5]  # a 0-token sequence and a 1-token (decode-like) row in the same batch
    ctx = [45, 7, 30, 5]  # cached history before the new tokens (bottom-right aligned), and a fresh prompt
    k_cache, v_cache = _paged_cache(16, 16, 1, 16, 16, gen)
    tables = _block_tables(ctx, 16, 16, gen)
    q = torch.randn(sum(q_lens), 2, 16, generator=gen)
    args = (q, k_cache, v_cache, tables, _cu(q_lens), torch.tensor(ctx, dtype=torch.int32), 0.3)
    _close(paged.paged_prefill(*args, max_query_len=20), paged_prefill_ref(*args))


def test_paged_prefill_sinks_window_dk_ne_dv(kernels):
    paged, _ = kernels
    gen = torch.Generator().manual_seed(4)
    q_lens, ctx = [18, 3], [40, 3]
    k_cache, v_cache = _paged_cache(8, 16, 1, 32, 16, gen)
    tables = _block_tables(ctx, 16, 8, gen)
    q = torch.randn(sum(q_lens), 2, 32, generator=gen)
    sinks = torch.randn(2, generator=gen)
    args = (q, k_cache, v_cache, tables, _cu(q_lens), torch.tensor(ctx, dtype=torch.int32), 0.2)
    got = paged.paged_prefill(*args, max_query_len=18, sinks=sinks, sliding_window=9)
    _close(got, paged_prefill_ref(*args, sinks=sinks, sliding_window=9))
    empty = paged.paged_prefill(q[:0], *args[1:4], _cu([0, 0]), args[5], 0.2, max_query_len=0)
    assert empty.shape == (0, 2, 16)


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window+sinks"])
def test_varlen_prefill_wide_keys(kernels, window):
    """MLA's expanded prefill: Dk (here 48 or 40, like 192) is not a power of two and differs from Dv."""
    paged, _ = kernels
    gen = torch.Generator().manual_seed(5)
    q_lens, kv_lens = [17, 2], [17, 9]  # a fresh prompt and an extend over 7 cached rows
    dk = 40 if window else 48  # 32 + 16 through the tensor cores; 32 + 8 (masked to 16)
    q = torch.randn(sum(q_lens), 2, dk, generator=gen)
    k = torch.randn(sum(kv_lens), 2, dk, generator=gen)
    v = torch.randn(sum(kv_lens), 2, 32, generator=gen)
    sinks = torch.randn(2, generator=gen) if window else None
    args = (q, k, v, _cu(q_lens), _cu(kv_lens), 0.15)
    got = paged.varlen_prefill(*args, max_query_len=17, sinks=sinks, sliding_window=window)
    _close(got, varlen_prefill_ref(*args, sinks=sinks, sliding_window=window))


def test_varlen_prefill_split_rope_columns(kernels):
    """MLA's expanded prefill without concatenation: q_nope / k_nope (strided views of wider projections, as
    kv_b's split gives them) plus q_pe and the one rope key per token shared by every head (head stride 0)
    equal the reference over [q_nope | q_pe] and [k_nope | k_pe]."""
    paged, _ = kernels
    gen = torch.Generator().manual_seed(8)
    q_lens, kv_lens, heads, dn, dr, dv = [17, 2], [17, 9], 3, 32, 16, 24
    q_wide = torch.randn(sum(q_lens), heads, dn + 8, generator=gen)
    kv = torch.randn(sum(kv_lens), heads, dn + dv, generator=gen)  # kv_b's output: [k_nope | v] per head
    q_nope, (k_nope, v) = q_wide[..., :dn], kv.split([dn, dv], dim=-1)
    q_pe = torch.randn(sum(q_lens), heads, dr, generator=gen)
    k_pe = torch.randn(sum(kv_lens), dr, generator=gen)[:, None, :].expand(-1, heads, -1)
    assert k_pe.stride(1) == 0 and not k_nope.is_contiguous()
    cu = (_cu(q_lens), _cu(kv_lens))
    got = paged.varlen_prefill(q_nope, k_nope, v, *cu, 0.2, max_query_len=17, q_rope=q_pe, k_rope=k_pe)
    q, k = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)
    _close(got, varlen_prefill_ref(q, k, v.contiguous(), *cu, 0.2))
    with pytest.raises(ValueError, match="both q_rope and k_rope"):
        paged.varlen_prefill(q_nope, k_nope, v, *cu, 0.2, max_query_len=17, q_rope=q_pe)
    with pytest.raises(ValueError, match="power-of-two first part"):
        paged.varlen_prefill(  # 24 + 8: the first part is not the largest power of two <= 32
            q_wide[..., :24],
            kv[..., :24],
            v,
            *cu,
            0.2,
            max_query_len=17,
            q_rope=q_pe[..., :8],
            k_rope=k_pe[..., :8],
        )


@pytest.mark.parametrize(
    "num_splits,block_n,q_in_loop,tma",
    [(1, None, False, False), (3, None, False, False), (2, None, True, False), (1, 32, False, False),
     (2, 16, False, True), (1, 16, True, True)],
)  # fmt: skip
def test_mla_decode_matches_reference(kernels, num_splits, block_n, q_in_loop, tma):
    """Lengths 1, 33, 40, 64 over 16-token pages: full tiles (unmasked loads), partial last tiles, a sequence
    shorter than a tile and empty splits. block_n 16 <= the page reads one block-table entry per tile (and
    through TMA descriptors with tma); 32 > the page looks up every key's page."""
    _, mla = kernels
    gen = torch.Generator().manual_seed(6)
    lens, rank, rope = [1, 33, 40, 64], 64, 16
    kv = torch.randn(16, 16, 1, rank + rope, generator=gen)  # [N, bs, 1, R + Dr] view accepted
    tables = _block_tables(lens, 16, 16, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q_latent = torch.randn(4, 16, rank, generator=gen)
    q_rope = torch.randn(4, 16, rope, generator=gen)
    config = None  # the per-shape default, with num_splits forced
    if block_n is not None:
        config = DecodeConfig(
            block_n=block_n, num_splits=num_splits, num_warps=4, num_stages=1, q_in_loop=q_in_loop, tma=tma
        )
    got = mla.mla_decode(
        q_latent, q_rope, kv, tables, seq_lens, 0.1, kv_lora_rank=rank, num_splits=num_splits, config=config
    )
    _close(got, mla_decode_ref(q_latent, q_rope, kv, tables, seq_lens, 0.1, kv_lora_rank=rank))


def test_mla_decode_tma_refuses_tiles_across_pages(kernels):
    _, mla = kernels
    kv = torch.zeros(4, 16, 80)
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    cfg = DecodeConfig(block_n=32, num_splits=1, num_warps=4, num_stages=1, tma=True)
    with pytest.raises(ValueError, match="tma=False"):
        mla.mla_decode(torch.zeros(1, 16, 64), torch.zeros(1, 16, 16), kv, tables, lens, 1.0, kv_lora_rank=64,
                       config=cfg)  # fmt: skip


def test_mla_decode_empty_batch_and_bad_rank(kernels):
    _, mla = kernels
    kv = torch.zeros(4, 16, 80)
    tables, lens = torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    out = mla.mla_decode(
        torch.zeros(0, 16, 64), torch.zeros(0, 16, 16), kv, tables, lens, 1.0, kv_lora_rank=64
    )
    assert out.shape == (0, 16, 64)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla.mla_decode(torch.zeros(0, 16, 64), torch.zeros(0, 16, 8), kv, tables, lens, 1.0, kv_lora_rank=64)


def test_split_choice_is_a_pure_function_of_host_shapes(monkeypatch):
    from moefleet.engine.kernels import attention_config as ac

    # an H200's 132 SMs stand in for the device query on this CUDA-less machine
    monkeypatch.setattr(ac, "_sm_count", lambda device: ac.H200_SMS)
    monkeypatch.setattr(ac, "_has_tma", lambda device: True)
    cuda = torch.device("cuda")
    assert ac.choose_num_splits(1024, 2000, cuda) == 1  # 256 sequences x 4 KV heads fill the GPU
    assert ac.choose_num_splits(32, 32768, cuda) == 9  # 8 sequences x 4 KV heads: ~2 programs per SM
    assert ac.choose_num_splits(1, 1 << 20, cuda) == ac.MAX_SPLITS
    assert ac.choose_num_splits(1, 300, cuda) == 1  # too short to split
    sms = ac._sm_count(cuda)
    assert ac.choose_num_splits(2 * sms - 2 * sms // 8, 2000, cuda) == 1  # within 1/8 of two waves: no split
    assert ac.choose_num_splits(2 * sms - 2 * sms // 8 - 1, 2000, cuda) == 2
    assert ac.mla_decode_config(4, 128, 512, 32768, cuda, num_splits=5).num_splits == 5
    mla = ac.mla_decode_config(256, 128, 512, 2000, cuda)
    assert (mla.block_h, mla.block_n, mla.num_splits) == (64, 64, 1)
    # float32 tiles fit an H200's 227 KB of shared memory (the bf16 tiling needed 311 KB at 4 bytes and failed
    # to launch there): q tile + one K/V tile per stage, 576 = 512 latent + 64 rope columns, 4 bytes each
    f32 = ac.mla_decode_config(3, 128, 512, 32768, cuda, element_size=4)
    assert (f32.block_h + f32.num_stages * f32.block_n) * 576 * 4 <= 232448
    # bf16 holds the query tile in shared memory next to two key tiles (Triton keeps num_stages - 1 pointer-load
    # buffers and up to 2 TMA buffers: 221 KB as compiled for sm_90, ran on H200 on 2026-12-01)
    for page in (16, 64):
        bf16 = ac.mla_decode_config(3, 128, 512, 32768, cuda, element_size=2, block_size=page, capturing=True)
        assert not bf16.q_in_loop and (bf16.block_h + 2 * bf16.block_n) * 576 * 2 <= 232448
        assert bf16.tma == (page >= bf16.block_n)  # TMA only where a tile lies within one page
    # eagerly, small launches keep pointer loads (TMA's descriptors cost host time per launch); captured, TMA
    assert not ac.mla_decode_config(1, 128, 512, 4096, cuda, block_size=64).tma
    assert ac.mla_decode_config(1, 128, 512, 4096, cuda, block_size=64, capturing=True).tma
    assert ac.mla_decode_config(256, 128, 512, 2000, cuda, block_size=64).tma
    monkeypatch.setattr(ac, "_has_tma", lambda device: False)  # pre-Hopper
    assert not ac.mla_decode_config(3, 128, 512, 32768, cuda, block_size=64, capturing=True).tma
    # expanded MLA prefill (Dk 192, Dv 128): q tile + K and V tiles per stage
    for size in (2, 4):
        for dk, dv in ((192, 128), (128, 128)):
            pre = ac.prefill_config(dk, dv, cuda, element_size=size)
            assert (pre.block_m * dk + pre.num_stages * pre.block_n * (dk + dv)) * size <= 232448
