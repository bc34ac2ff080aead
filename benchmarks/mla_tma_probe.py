"""MLA decode at 64-token pages, TMA descriptors vs pointer loads, eager (host launch cost included) and replayed
from a CUDA graph (GPU time only), at small and large batches; plus the default config's choice in both modes.

    python3 benchmarks/mla_tma_probe.py
"""

from __future__ import annotations

import dataclasses

import torch
import triton
from attention_kernels import MLA_HEADS, MLA_RANK, mla_inputs
from moefleet.engine.kernels.attention_config import mla_decode_config
from moefleet.engine.kernels.mla_decode import mla_decode

PAGE = 64


def _us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3


def _graph(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> None:
    torch.manual_seed(0)
    print(
        "| batch x length | TMA eager us | TMA graph us | pointers eager us | pointers graph us | default |"
    )
    print("|---|---|---|---|---|---|")
    for batch, length in [(1, 4096), (8, 2048), (32, 2048), (256, 2000)]:
        q_lat, q_pe, kv, tables, lens = mla_inputs(batch, length, PAGE)
        out = torch.empty_like(q_lat)
        base = mla_decode_config(
            batch, MLA_HEADS, MLA_RANK, length, q_lat.device, block_size=PAGE, capturing=True
        )
        cells = []
        for tma in (True, False):
            cfg = dataclasses.replace(base, tma=tma)

            def run(cfg: object = cfg) -> None:
                mla_decode(q_lat, q_pe, kv, tables, lens, 0.07, kv_lora_rank=MLA_RANK, out=out, config=cfg)  # noqa: B023

            cells += [f"{_us(run):.1f}", f"{_us(_graph(run).replay):.1f}"]
        eager = mla_decode_config(batch, MLA_HEADS, MLA_RANK, length, q_lat.device, block_size=PAGE)
        default = f"eager tma={int(eager.tma)}, captured tma={int(base.tma)}"
        print(f"| {batch} x {length} | " + " | ".join(cells) + f" | {default} |", flush=True)


if __name__ == "__main__":
    main()
