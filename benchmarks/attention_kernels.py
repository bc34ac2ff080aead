"""GPU microbenchmark of the Triton attention kernels (engine/kernels) at the shapes of issue 8.

- paged_decode, Qwen3-30B-A3B attention (H=32, Hk=4, D=128), 256 sequences x 2,000 cached tokens, 16-token
  pages in shuffled order: time, K/V bytes read, achieved GB/s and fraction of the H200's HBM peak.
- mla_decode, DeepSeek-V3 attention per GPU (H=128, R=512, Dr=64), 256 x 2,000: the same, plus TFLOP/s
  (its 128 heads make it nearly compute-bound: ~240 FLOP per byte of latent cache).
- the same two at 8 sequences x 32,768 tokens (long context: split-K over the sequence).
- paged_prefill over 16k tokens (one fresh 16k prompt; and 4,096 new tokens over 12,288 cached), and the MLA
  expanded varlen_prefill (H=128, Dk=192, Dv=128) over 16k: TFLOP/s and MFU.

Peaks used (NVIDIA H200 SXM datasheet): HBM 4.8 TB/s, dense bf16 989 TFLOP/s. A device-to-device copy is
timed too, as the practical bandwidth ceiling. Attention FLOPs: 2 * H * (Dk + Dv) per visible (query, key)
pair (causal: sum over queries of their visible keys). Times: triton.testing.do_bench (median, ms).

    python3 benchmarks/attention_kernels.py [--sweep]    # --sweep also times alternative tile configs
"""

from __future__ import annotations

import argparse

import torch
import triton
from moefleet.engine.kernels.attention_config import DecodeConfig, PrefillConfig
from moefleet.engine.kernels.mla_decode import mla_decode
from moefleet.engine.kernels.paged_attention import paged_decode, paged_prefill, varlen_prefill

HBM_PEAK = 4.8e12
BF16_PEAK = 989e12
DTYPE = torch.bfloat16


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200)


def _tables(batch: int, length: int, block_size: int) -> tuple[torch.Tensor, int]:
    per_seq = -(-length // block_size)
    blocks = batch * per_seq
    table = torch.randperm(blocks, device="cuda").int().view(batch, per_seq)
    return table, blocks


def _row(
    name: str, ms: float, nbytes: float | None = None, flops: float | None = None, note: str = ""
) -> None:
    cells = [name, f"{ms * 1e3:8.1f}"]
    cells += (
        [f"{nbytes / 1e9:.3f}", f"{nbytes / ms / 1e6:,.0f}", f"{nbytes / ms / 1e-3 / HBM_PEAK:.0%}"]
        if nbytes
        else ["", "", ""]
    )
    cells += [f"{flops / ms / 1e9:,.1f}", f"{flops / ms / 1e-3 / BF16_PEAK:.0%}"] if flops else ["", ""]
    print("| " + " | ".join([*cells, note]) + " |", flush=True)


def _timed(name: str, fn, nbytes: float | None = None, flops: float | None = None, note: str = "") -> None:
    try:
        _row(name, _ms(fn), nbytes, flops, note)
    except Exception as exc:  # a sweep config that does not fit (shared memory, registers) is reported
        print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:100]} | | | | | | {note} |", flush=True)


def copy_ceiling() -> None:
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    _timed("device copy 2 GiB (read + write)", lambda: dst.copy_(src), nbytes=2 * src.numel())


def decode_qwen3(sweep: bool, batch: int = 256, length: int = 2000) -> None:
    heads, kv_heads, dim, bs = 32, 4, 128, 16
    tables, blocks = _tables(batch, length, bs)
    kv = torch.randn(2, blocks, bs, kv_heads, dim, dtype=DTYPE, device="cuda")
    q = torch.randn(batch, heads, dim, dtype=DTYPE, device="cuda")
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    nbytes = batch * length * kv_heads * 2 * dim * 2 + 2 * q.numel() * 2
    flops = 2 * batch * length * heads * 2 * dim
    name = f"paged_decode Qwen3 B={batch} ctx={length}"

    def run(cfg=None):
        return paged_decode(q, kv[0], kv[1], tables, lens, dim**-0.5, out=out, config=cfg)

    _timed(name, run, nbytes, flops, "default")
    if not sweep:
        return
    for block_n, warps, stages, splits in [
        (64, 4, 3, 2), (64, 4, 2, 1), (64, 4, 4, 1), (128, 4, 3, 1), (32, 4, 3, 1),
    ]:  # fmt: skip
        cfg = DecodeConfig(block_n=block_n, num_splits=splits, num_warps=warps, num_stages=stages)
        _timed(
            name, lambda cfg=cfg: run(cfg), nbytes, flops, f"n={block_n} w={warps} s={stages} splits={splits}"
        )


# MLA tilings the sweep times at each page size: (heads, keys, warps, stages, q_in_loop, tma); TMA rows need
# keys <= the page size. History: 16 warps (1,395 us), 128 keys (969), 32 x 32 (990), v_split (2x slower) and
# Triton warp specialisation (684) all lost to 64 x 64 x 8 warps at 16-token pages (640 us, q_in_loop, 3 stages).
MLA_SWEEP = [
    (64, 64, 8, 3, True, False), (64, 64, 8, 3, False, False), (64, 64, 8, 2, False, False),
    (64, 64, 8, 2, True, False), (64, 64, 8, 3, False, True), (64, 64, 8, 2, False, True),
    (64, 64, 8, 3, True, True), (64, 64, 8, 2, True, True), (64, 32, 8, 3, False, True),
    (64, 32, 8, 4, False, True), (64, 32, 8, 3, True, False), (64, 16, 8, 4, False, True),
]  # fmt: skip


MLA_HEADS, MLA_RANK, MLA_ROPE = 128, 512, 64  # DeepSeek-V3 attention per GPU


def mla_inputs(batch: int, length: int, page: int) -> tuple[torch.Tensor, ...]:
    """(q_latent, q_rope, kv_cache, block_tables, seq_lens) of an MLA decode step: `batch` sequences of `length`
    cached tokens in shuffled `page`-token pages (also used by mla_decode_shapes.py and mla_tma_probe.py)."""
    q_lat = torch.randn(batch, MLA_HEADS, MLA_RANK, dtype=DTYPE, device="cuda") * 0.1
    q_pe = torch.randn(batch, MLA_HEADS, MLA_ROPE, dtype=DTYPE, device="cuda") * 0.1
    tables, blocks = _tables(batch, length, page)
    kv = torch.randn(blocks, page, MLA_RANK + MLA_ROPE, dtype=DTYPE, device="cuda")
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return q_lat, q_pe, kv, tables, lens


def decode_mla(
    sweep: bool, batch: int = 256, length: int = 2000, block_sizes: tuple[int, ...] = (16,)
) -> None:
    heads, rank, rope = MLA_HEADS, MLA_RANK, MLA_ROPE
    nbytes = batch * length * (rank + rope) * 2 + 2 * batch * heads * rank * 2
    flops = 2 * batch * length * heads * (rank + rope + rank)
    for bs in block_sizes:
        q_lat, q_pe, kv, tables, lens = mla_inputs(batch, length, bs)
        out = torch.empty_like(q_lat)
        name = f"mla_decode DeepSeek-V3 B={batch} ctx={length} page={bs}"

        def run(cfg=None, inputs=(q_lat, q_pe, kv, tables, lens), out=out):
            return mla_decode(*inputs, 0.07, kv_lora_rank=rank, out=out, config=cfg)

        _timed(name, run, nbytes, flops, "default")
        if not sweep:
            continue
        for block_h, block_n, warps, stages, qloop, tma in MLA_SWEEP:
            if tma and block_n > bs:
                continue
            cfg = DecodeConfig(
                block_n=block_n,
                num_splits=1,
                num_warps=warps,
                num_stages=stages,
                block_h=block_h,
                q_in_loop=qloop,
                tma=tma,
            )
            note = f"h={block_h} n={block_n} w={warps} s={stages} qloop={int(qloop)} tma={int(tma)}"
            _timed(name, lambda cfg=cfg: run(cfg), nbytes, flops, note)


def _causal_pairs(q_len: int, ctx: int) -> int:
    """Visible (query, key) pairs of q_len new tokens at the end of a ctx-long causal context."""
    return q_len * (ctx - q_len) + q_len * (q_len + 1) // 2


def prefill(sweep: bool, tokens: int = 16384) -> None:
    heads, kv_heads, dim, bs = 32, 4, 128, 16
    for q_len, ctx in [(tokens, tokens), (tokens // 4, tokens)]:
        tables, blocks = _tables(1, ctx, bs)
        kv = torch.randn(2, blocks, bs, kv_heads, dim, dtype=DTYPE, device="cuda")
        q = torch.randn(q_len, heads, dim, dtype=DTYPE, device="cuda")
        cu = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        flops = 2 * heads * 2 * dim * _causal_pairs(q_len, ctx)
        name = f"paged_prefill Qwen3 {q_len} new / {ctx} ctx"

        def run(cfg=None, q=q, kv=kv, tables=tables, cu=cu, lens=lens, q_len=q_len):
            return paged_prefill(
                q, kv[0], kv[1], tables, cu, lens, dim**-0.5, max_query_len=q_len, config=cfg
            )

        _timed(name, run, flops=flops, note="default")
        if sweep and q_len == tokens:
            for block_m, block_n, warps, stages in [
                (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3),
                (64, 128, 8, 3),
            ]:  # fmt: skip
                cfg = PrefillConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
                _timed(
                    name,
                    lambda cfg=cfg: run(cfg),
                    flops=flops,
                    note=f"m={block_m} n={block_n} w={warps} s={stages}",
                )
    # DeepSeek-V3 expanded MLA prefill: 128 heads, Dk = 192 (128 nope + 64 rope), Dv = 128
    heads, dk, dv = 128, 192, 128
    q = torch.randn(tokens, heads, dk, dtype=DTYPE, device="cuda")
    k = torch.randn(tokens, heads, dk, dtype=DTYPE, device="cuda")
    v = torch.randn(tokens, heads, dv, dtype=DTYPE, device="cuda")
    cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    flops = 2 * heads * (dk + dv) * _causal_pairs(tokens, tokens)
    name = f"varlen_prefill MLA-expanded {tokens}"

    def run_mla(cfg=None):
        return varlen_prefill(q, k, v, cu, cu, dk**-0.5, max_query_len=tokens, config=cfg)

    _timed(name, run_mla, flops=flops, note="default")
    if sweep:
        for block_m, block_n, warps, stages in [
            (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3),
        ]:  # fmt: skip
            cfg = PrefillConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            _timed(
                name,
                lambda cfg=cfg: run_mla(cfg),
                flops=flops,
                note=f"m={block_m} n={block_n} w={warps} s={stages}",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    parser.add_argument("--mla-only", action="store_true", help="only the MLA decode rows (and their sweep)")
    parser.add_argument(
        "--mla-pages", default="16", help="comma-separated KV page sizes for the MLA decode rows"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(
        f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}"
    )
    print(
        f"# peaks: HBM {HBM_PEAK / 1e12:.1f} TB/s, dense bf16 {BF16_PEAK / 1e12:.0f} TFLOP/s (H200 SXM datasheet)"
    )
    print("| kernel | time (us) | GB read | GB/s | of HBM peak | TFLOP/s | MFU | config |")
    print("|---|---|---|---|---|---|---|---|")
    copy_ceiling()
    pages = tuple(int(p) for p in args.mla_pages.split(","))
    if args.mla_only:
        decode_mla(args.sweep, block_sizes=pages)
        return
    decode_qwen3(args.sweep)
    decode_qwen3(False, batch=8, length=32768)  # long context: split-K
    decode_mla(args.sweep, block_sizes=pages)
    decode_mla(False, batch=8, length=32768, block_sizes=pages)
    prefill(args.sweep)


if __name__ == "__main__":
    main()
