"""On an NVIDIA GPU: the compiled Triton attention kernels (engine/kernels) against the torch references
(engine/kernels/attention_reference.py, float32 math from the formula) at model shapes: Qwen3-30B-A3B GQA
(H=32, Hk=4, D=128), gpt-oss (sinks, sliding window), DeepSeek-V3 MLA (H=128, R=512, Dr=64) and its
expanded prefill (Dk=192, Dv=128); long contexts (32k) through split-K; CUDA-graph replay with new lengths.

Tolerances (atol = rtol, on outputs of magnitude ~1): float32 inputs 2e-4 (exact fp32 dots, online softmax
over up to 32k keys), bfloat16 inputs 2e-2 (probabilities rounded to bf16 before the PV product, like every
flash kernel). Skipped where no GPU is visible (CI).
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

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no triton on this machine: every test here is skipped anyway
    OutOfResources = RuntimeError  # type: ignore[misc,assignment]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.timeout(600),
]

TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}
DTYPES = [torch.bfloat16, torch.float32]


def _tables(lens, block_size, gen, device="cuda"):
    need = [-(-n // block_size) for n in lens]
    total = max(sum(need), 1)
    pool = torch.randperm(total + 7, generator=gen)  # shuffled, non-contiguous pages, some unused
    table = torch.full((len(lens), max([*need, 1]) + 2), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = pool[at : at + n].int()
        at += n
    return table.to(device), total + 7


def _cache(num_blocks, block_size, kv_heads, dk, dv, dtype, gen):
    if dk == dv:
        kv = torch.randn(2, num_blocks, block_size, kv_heads, dk, generator=gen).to("cuda", dtype)
        return kv[0], kv[1]
    k = torch.randn(num_blocks, block_size, kv_heads, dk, generator=gen).to("cuda", dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, dv, generator=gen).to("cuda", dtype)
    return k, v


def _check(got, expected, dtype):
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _cu(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_decode_qwen3_shape(dtype, block_size):
    from moefleet.engine.kernels.paged_attention import paged_decode

    gen = torch.Generator().manual_seed(0)
    lens = [1, 2, 15, 16, 17, 100, 511, 2000, 2999] + torch.randint(1, 3000, (24,), generator=gen).tolist()
    tables, blocks = _tables(lens, block_size, gen)
    k, v = _cache(blocks, block_size, 4, 128, 128, dtype, gen)
    q = torch.randn(len(lens), 32, 128, generator=gen).to("cuda", dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    got = paged_decode(q, k, v, tables, seq_lens, 128**-0.5)
    assert got.dtype == dtype
    _check(got, paged_decode_ref(q, k, v, tables, seq_lens, 128**-0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_gpt_oss_sinks_window(dtype):
    from moefleet.engine.kernels.paged_attention import paged_decode

    gen = torch.Generator().manual_seed(1)
    lens = [1, 127, 128, 129, 700, 4000]
    tables, blocks = _tables(lens, 16, gen)
    k, v = _cache(blocks, 16, 8, 64, 64, dtype, gen)
    q = torch.randn(len(lens), 64, 64, generator=gen).to("cuda", dtype)
    sinks = torch.randn(64, generator=gen).cuda()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for splits in (None, 4):
        got = paged_decode(
            q, k, v, tables, seq_lens, 0.125, sinks=sinks, sliding_window=128, num_splits=splits
        )
        expected = paged_decode_ref(q, k, v, tables, seq_lens, 0.125, sinks=sinks, sliding_window=128)
        _check(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_context_32k_split_k(dtype):
    from moefleet.engine.kernels.attention_config import paged_decode_config
    from moefleet.engine.kernels.mla_decode import mla_decode
    from moefleet.engine.kernels.paged_attention import paged_decode

    gen = torch.Generator().manual_seed(2)
    lens = [32768, 32000, 5]
    tables, blocks = _tables(lens, 16, gen)
    assert paged_decode_config(len(lens), 4, 128, 32768, torch.device("cuda")).num_splits > 1
    k, v = _cache(blocks, 16, 4, 128, 128, dtype, gen)
    q = torch.randn(len(lens), 32, 128, generator=gen).to("cuda", dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    _check(
        paged_decode(q, k, v, tables, seq_lens, 0.09),
        paged_decode_ref(q, k, v, tables, seq_lens, 0.09),
        dtype,
    )

    kv = torch.randn(blocks, 16, 576, generator=gen).to("cuda", dtype)
    q_lat = torch.randn(len(lens), 128, 512, generator=gen).to("cuda", dtype) * 0.1
    q_pe = torch.randn(len(lens), 128, 64, generator=gen).to("cuda", dtype) * 0.1
    got = mla_decode(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512)
    _check(got, mla_decode_ref(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512), dtype)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_decode_deepseek_shape(dtype, page):
    from moefleet.engine.kernels.mla_decode import mla_decode

    gen = torch.Generator().manual_seed(3)
    lens = [1, 16, 33, 64, 2000] + torch.randint(1, 4000, (12,), generator=gen).tolist()
    tables, blocks = _tables(lens, page, gen)
    kv = torch.randn(blocks, page, 1, 576, generator=gen).to("cuda", dtype)
    q_lat = torch.randn(len(lens), 128, 512, generator=gen).to("cuda", dtype) * 0.1
    q_pe = torch.randn(len(lens), 128, 64, generator=gen).to("cuda", dtype) * 0.1
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    expected = mla_decode_ref(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512)
    for splits in (None, 1, 7):
        got = mla_decode(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512, num_splits=splits)
        _check(got, expected, dtype)
    if dtype != torch.bfloat16:
        return
    # other tilings the benchmark sweeps, in bf16 only (compiling each takes seconds; a config that does not
    # fit this GPU's shared memory is skipped: the benchmark reports those); TMA ones need keys <= the page
    for block_h, block_n, warps, stages, qloop, tma in [
        (64, 32, 8, 2, False, False),
        (64, 64, 8, 3, False, False),
        (64, 64, 16, 2, True, False),
        (64, 16, 8, 4, False, True),
        (64, 64, 8, 2, False, True),
        (64, 32, 8, 3, True, True),
    ]:
        if tma and block_n > page:
            continue
        cfg = DecodeConfig(block_n, 3, warps, stages, block_h=block_h, q_in_loop=qloop, tma=tma)
        try:
            got = mla_decode(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512, config=cfg)
        except OutOfResources:
            continue
        _check(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_chunked(dtype):
    from moefleet.engine.kernels.paged_attention import paged_prefill

    gen = torch.Generator().manual_seed(4)
    q_lens, cached = [1, 500, 1000, 37, 0], [0, 1200, 10, 3000, 8]
    ctx = [a + b for a, b in zip(q_lens, cached, strict=True)]
    tables, blocks = _tables(ctx, 16, gen)
    k, v = _cache(blocks, 16, 4, 128, 128, dtype, gen)
    q = torch.randn(sum(q_lens), 32, 128, generator=gen).to("cuda", dtype)
    args = (q, k, v, tables, _cu(q_lens), torch.tensor(ctx, dtype=torch.int32, device="cuda"), 128**-0.5)
    _check(paged_prefill(*args, max_query_len=1000), paged_prefill_ref(*args), dtype)
    sinks = torch.randn(32, generator=gen).cuda()
    got = paged_prefill(*args, max_query_len=1000, sinks=sinks, sliding_window=128)
    _check(got, paged_prefill_ref(*args, sinks=sinks, sliding_window=128), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_prefill_mla_expanded(dtype):
    from moefleet.engine.kernels.paged_attention import varlen_prefill

    gen = torch.Generator().manual_seed(5)
    q_lens, kv_lens = [1, 300, 1024], [1, 700, 1024]
    q = torch.randn(sum(q_lens), 16, 192, generator=gen).to("cuda", dtype)
    k = torch.randn(sum(kv_lens), 16, 192, generator=gen).to("cuda", dtype)
    v = torch.randn(sum(kv_lens), 16, 128, generator=gen).to("cuda", dtype)
    args = (q, k, v, _cu(q_lens), _cu(kv_lens), 192**-0.5)
    _check(varlen_prefill(*args, max_query_len=1024), varlen_prefill_ref(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_prefill_mla_split_rope_in_place(dtype):
    """The backend's MLA prefill call: k_nope / v as views of kv_b's output, the shared rope key with head
    stride 0, q_nope / q_pe apart; equal to the reference over the concatenations."""
    from moefleet.engine.kernels.paged_attention import varlen_prefill

    gen = torch.Generator().manual_seed(7)
    q_lens, kv_lens, heads = [1, 300, 1024], [1, 700, 1024], 16
    q_nope = torch.randn(sum(q_lens), heads, 128, generator=gen).to("cuda", dtype)
    q_pe = torch.randn(sum(q_lens), heads, 64, generator=gen).to("cuda", dtype)
    kv = torch.randn(sum(kv_lens), heads, 256, generator=gen).to("cuda", dtype)
    k_nope, v = kv.split([128, 128], dim=-1)
    k_pe = torch.randn(sum(kv_lens), 64, generator=gen).to("cuda", dtype)[:, None, :].expand(-1, heads, -1)
    cu = (_cu(q_lens), _cu(kv_lens))
    got = varlen_prefill(q_nope, k_nope, v, *cu, 192**-0.5, max_query_len=1024, q_rope=q_pe, k_rope=k_pe)
    q, k = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)
    _check(got, varlen_prefill_ref(q, k, v.contiguous(), *cu, 192**-0.5), dtype)


def test_decode_kernels_replay_in_cuda_graph():
    """Captured once, replayed with new lengths and pages: no host reads of seq_lens, grids from shapes."""
    from moefleet.engine.kernels.mla_decode import mla_decode
    from moefleet.engine.kernels.paged_attention import paged_decode

    gen = torch.Generator().manual_seed(6)
    batch, width, blocks = 8, 64, 600
    k, v = _cache(blocks, 16, 4, 128, 128, torch.bfloat16, gen)
    kv = torch.randn(blocks, 16, 576, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(batch, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    q_lat = torch.randn(batch, 128, 512, generator=gen).to("cuda", torch.bfloat16) * 0.1
    q_pe = torch.randn(batch, 128, 64, generator=gen).to("cuda", torch.bfloat16) * 0.1
    tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    seq_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, 32, 128, dtype=torch.bfloat16, device="cuda")
    out_mla = torch.empty(batch, 128, 512, dtype=torch.bfloat16, device="cuda")

    def step():
        paged_decode(q, k, v, tables, seq_lens, 0.09, out=out)
        mla_decode(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512, out=out_mla)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(2):
        lens = torch.randint(1, width * 16, (batch,), generator=gen)
        lens[trial] = 0 if trial else 1  # a padded row, a one-token row
        tables.copy_(torch.randperm(blocks, generator=gen)[: batch * width].view(batch, width).int())
        seq_lens.copy_(lens.int())
        graph.replay()
        torch.cuda.synchronize()
        _check(out, paged_decode_ref(q, k, v, tables, seq_lens, 0.09), torch.bfloat16)
        _check(
            out_mla, mla_decode_ref(q_lat, q_pe, kv, tables, seq_lens, 0.07, kv_lora_rank=512), torch.bfloat16
        )
