"""MLA decode (DeepSeek-V3 per GPU: H 128, R 512, Dr 64, bf16) at several batch x context shapes and page sizes,
with each tree's default tiling: run once per source tree to compare kernels side by side in one call.

    PYTHONPATH=<tree> python3 benchmarks/mla_decode_shapes.py [--label NAME]
Prints one markdown row per (shape, page): median time (triton.testing.do_bench) and TFLOP/s.
"""

from __future__ import annotations

import argparse

import torch
import triton
from attention_kernels import MLA_HEADS, MLA_RANK, MLA_ROPE, mla_inputs
from moefleet.engine.kernels.mla_decode import mla_decode

SHAPES = [(256, 2000), (64, 8192), (8, 32768), (1, 4096)]  # (sequences, tokens each)
PAGES = (16, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    for batch, length in SHAPES:
        flops = 2 * batch * length * MLA_HEADS * (MLA_RANK + MLA_ROPE + MLA_RANK)
        for page in PAGES:
            inputs = mla_inputs(batch, length, page)
            ms = triton.testing.do_bench(
                lambda a=inputs, n=length: mla_decode(*a, 0.07, kv_lora_rank=MLA_RANK, max_seq_len=n),
                warmup=25,
                rep=200,
            )
            print(
                f"| {args.label} | {batch} x {length} | {page} | {ms * 1e3:.1f} | {flops / ms / 1e9:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
