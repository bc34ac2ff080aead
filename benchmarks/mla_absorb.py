"""MLA decode's weight absorption on one GPU: einsum (cuBLAS batched GEMM) vs the per-head Triton matmul.

    python3 benchmarks/mla_absorb.py    # DeepSeek-V3 per GPU: H 128, Dn 128, R 512, Dv 128; T = 64 and 256 tokens

Both directions: q_nope [T, H, Dn] @ W_UK[h] -> [T, H, R] and o_latent [T, H, R] @ W_UV[h]^T -> [T, H, Dv], with
W_UK / W_UV the split views of kv_b_proj's weight (as engine/layers/mla.py uses them); `triton.testing.do_bench`
medians; max abs error vs a float32 einsum.
"""

from __future__ import annotations

import torch
import triton
from moefleet.engine.kernels.head_matmul import head_matmul


def main() -> None:
    torch.manual_seed(0)
    heads, dn, dv, rank = 128, 128, 128, 512
    w_kv = torch.randn(heads, dn + dv, rank, device="cuda", dtype=torch.bfloat16) * 0.05
    w_uk, w_uv = w_kv.split([dn, dv], dim=1)
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    print("| direction | T | variant | us | TFLOP/s | max abs err vs fp32 |")
    print("|---|---|---|---|---|---|")
    for tokens in (64, 256):
        q_full = torch.randn(tokens, heads, dn + 64, device="cuda", dtype=torch.bfloat16)
        q = q_full[:, :, :dn]  # a split view, as q.split([Dn, Dr]) gives
        lat = torch.randn(tokens, heads, rank, device="cuda", dtype=torch.bfloat16)
        cases = [
            ("absorb q", q, w_uk, "thn,hnr->thr", w_uk, rank),
            ("absorb out", lat, w_uv.transpose(1, 2), "thr,hvr->thv", w_uv, dv),
        ]
        for direction, x, w, eq, w_eq, n in cases:
            ref = torch.einsum(eq, x.float(), w_eq.float())
            flops = 2 * tokens * heads * x.shape[2] * n
            variants = [("einsum (cuBLAS)", lambda x=x, eq=eq, w_eq=w_eq: torch.einsum(eq, x, w_eq))]
            variants.append(("head_matmul default", lambda x=x, w=w: head_matmul(x, w)))
            for block in [
                (64, 128, 64),
                (128, 128, 64),
                (64, 64, 64),
                (128, 64, 64),
                (64, 128, 128),
                (32, 128, 64),
            ]:
                variants.append(
                    (f"head_matmul {block}", lambda x=x, w=w, block=block: head_matmul(x, w, block=block))
                )
            for name, fn in variants:
                try:
                    err = (fn().float() - ref).abs().max().item()
                    us = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
                    print(
                        f"| {direction} | {tokens} | {name} | {us:.1f} | {flops / us / 1e6:.0f} | {err:.3g} |"
                    )
                except Exception as exc:  # a tile that does not fit is reported, not fatal
                    print(
                        f"| {direction} | {tokens} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |"
                    )


if __name__ == "__main__":
    main()
