"""Sigmoid routing's gate logits on one GPU: the reference's float32 GEMM vs the bf16 GEMM with float32
accumulation and output (`Router.logits_float32`), DeepSeek-V3 shapes (D 7168, 256 experts), microseconds.

    source benchmarks/device_setup.sh && python3 benchmarks/router_gate_probe.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from moefleet.engine.layers.router import Router, RoutingConfig


def main() -> None:
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    dev = torch.device("cuda", 0)
    router = Router(7168, RoutingConfig(num_experts=256, top_k=8, scoring="sigmoid")).to(dev)
    with torch.no_grad():
        router.weight.copy_((torch.randn(256, 7168, device=dev) * 0.02).to(torch.bfloat16))
    router.prepare_gate()
    print("| tokens | float32 F.linear us | bf16 GEMM, float32 out us | speed-up | max rel diff |")
    print("|---|---|---|---|---|")
    for tokens in (128, 256, 2048, 8192, 16384):
        hidden = torch.randn(tokens, 7168, device=dev).to(torch.bfloat16)
        ref_us = triton.testing.do_bench(lambda h=hidden: F.linear(h.float(), router.weight)) * 1e3
        new_us = triton.testing.do_bench(lambda h=hidden: router.logits_float32(h)) * 1e3
        ref = F.linear(hidden.float(), router.weight)
        diff = ((router.logits_float32(hidden) - ref).abs().max() / ref.abs().max()).item()
        print(f"| {tokens} | {ref_us:.1f} | {new_us:.1f} | {ref_us / new_us:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
