"""MLA decode (DeepSeek-V3 per GPU: H 128, R 512, Dr 64, bf16) at several batch x context shapes and page sizes,
with each tree's default tiling: run once per source tree to compare kernels side by side in one call.

    PYTHONPATH=<tree> python3 benchmarks/mla_decode_shapes.py [--label NAME]
Prints one markdown row per (shape, page): median time (triton.testing.do_bench) and TFLOP/s.
"""

from __future__ import annotations

import argparse

import torch
import triton
from moefleet.engine.kernels.mla_decode import mla_decode

SHAPES = [(256, 2000), (64, 8192), (8, 32768), (1, 4096)]  # (sequences, tokens each)
PAGES = (16, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, rank, rope = 128, 512, 64
    for batch, length in SHAPES:
        q_lat = torch.randn(batch, heads, rank, dtype=torch.bfloat16, device="cuda") * 0.1
        q_pe = torch.randn(batch, heads, rope, dtype=torch.bfloat16, device="cuda") * 0.1
        lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        flops = 2 * batch * length * heads * (rank + rope + rank)
        for page in PAGES:
            per_seq = -(-length // page)
            tables = torch.randperm(batch * per_seq, device="cuda").int().view(batch, per_seq)
            kv = torch.randn(batch * per_seq, page, rank + rope, dtype=torch.bfloat16, device="cuda")
            args_ = (q_lat, q_pe, kv, tables, lens, 0.07)
            ms = triton.testing.do_bench(
                lambda a=args_, n=length: mla_decode(*a, kv_lora_rank=rank, max_seq_len=n), warmup=25, rep=200
            )
            print(
                f"| {args.label} | {batch} x {length} | {page} | {ms * 1e3:.1f} | {flops / ms / 1e9:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
