"""Compiles the masked fused-MoE kernel's FP8-row variants, the masked (de)quantisation kernel and the MLA decode
tile (over TMA descriptors and pointers) for Hopper
(sm_90, down to a cubin with the ptxas bundled in the Triton wheel). Run by test_kernels_compile_sm90.py in a
subprocess WITHOUT TRITON_INTERPRET (under it, @triton.jit yields interpreted functions that cannot compile).
Prints one "OK <case>" line per kernel; exit 3 when this Triton has no NVIDIA compiler backend."""

from __future__ import annotations

import sys

import triton
import triton.language as tl

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - other Triton layouts
    sys.exit(3)

from moefleet.engine.kernels import fp8_masked, fused_moe

HOPPER = GPUTarget("cuda", 90, 32)
INTS = (
    "N K num_rows up_offset stride_ae stride_am stride_ak stride_be stride_bn stride_bk stride_cm stride_cn "
    "stride_ase stride_asm stride_ask stride_bse stride_bsn stride_bsk"
).split()


def compile_for_hopper(fn, signature: dict, constexprs: dict, **options):
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    try:
        return triton.compile(source, target=HOPPER, options=options)
    except FileNotFoundError:  # no ptxas
        sys.exit(3)


def gemm(weights: str, swiglu: bool) -> None:
    fp8_weights = weights == "fp8e4nv"
    signature = {
        "a_ptr": "*fp8e4nv",
        "b_ptr": f"*{weights}",
        "c_ptr": "*bf16",
        "a_scale_ptr": "*fp32",
        "b_scale_ptr": "*fp32",
        "weight_ptr": "*fp32",
        "sorted_ids_ptr": "*i32",
        "expert_ids_ptr": "*i32",
        "num_padded_ptr": "*i32",
        "masked_m_ptr": "*i32",
        **dict.fromkeys(INTS, "i32"),
    }
    constexprs = dict(
        A_ROW_DIV=1,
        MASKED=True,
        SWIGLU=swiglu,
        MUL_WEIGHT=False,
        FP8=fp8_weights,
        A_FP8=not fp8_weights,
        UPCAST_FP8=False,
        UPCAST_TYPE=tl.bfloat16,
        DOT_PRECISION="tf32",
        GROUP_N=128 if fp8_weights else 1,
        GROUP_K=128 if fp8_weights else 1,
        A_GROUP_K=128,
        BLOCK_M=16,
        BLOCK_N=64,
        BLOCK_K=128 if fp8_weights else 64,
        GROUP_M=1,
    )
    kernel = compile_for_hopper(fused_moe._moe_gemm_kernel, signature, constexprs, num_warps=4, num_stages=4)
    assert kernel.asm["cubin"]
    print(f"OK gemm weights={weights} swiglu={swiglu}", flush=True)


def masked_rows(quant: bool) -> None:
    x, y = ("bf16", "fp8e4nv") if quant else ("fp8e4nv", "bf16")
    ints = "D stride_xe stride_xm stride_xk stride_xse stride_xsm stride_xsk stride_ye stride_ym stride_yse stride_ysm"
    signature = {
        "x_ptr": f"*{x}",
        "xs_ptr": "*fp32",
        "y_ptr": f"*{y}",
        "ys_ptr": "*fp32",
        "masked_m_ptr": "*i32",
        **dict.fromkeys(ints.split(), "i32"),
    }
    constexprs = dict(QUANT=quant, GROUP=128, BLOCK_G=128, BLOCK_R=16, FP8_MAX_C=448.0, EPS=1e-10)
    kernel = compile_for_hopper(fp8_masked._masked_rows_kernel, signature, constexprs, num_warps=4)
    assert kernel.asm["cubin"]
    print(f"OK masked_rows quant={quant}", flush=True)


def mla_decode_tiles(tma: bool, page: int) -> None:
    """DeepSeek-V3's MLA decode tile (64 heads x 64 keys, 8 warps) over pages, via TMA descriptors or pointers,
    with the pointer arguments 16-byte aligned as the JIT specialises them (else no cp.async is emitted)."""
    from moefleet.engine.kernels import mla_decode

    fn = mla_decode._mla_decode_split_kernel
    ones = ["stride_qld", "stride_qrd", "stride_kvd", "stride_od", "stride_btm"]
    ints = (
        "H stride_qlb stride_qlh stride_qrb stride_qrh stride_kvb stride_kvs stride_btb stride_mb stride_mh "
        "stride_ms stride_md stride_lb stride_lh stride_ls stride_ob stride_oh"
    ).split()
    descs = ("tensordesc<bf16[64,512]>", "tensordesc<bf16[64,64]>") if tma else ("*bf16", "*bf16")
    signature = {
        "ql_ptr": "*bf16", "qr_ptr": "*bf16", "kv_ptr": "*bf16", "lat_desc": descs[0], "pe_desc": descs[1],
        "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "out_ptr": "*bf16",
        "qk_scale": "fp32", **dict.fromkeys(ints, "i32"),
    }  # fmt: skip
    constexprs = dict(
        R=512, DR=64, BLOCK_R=512, BLOCK_DR=64, BLOCK_H=64, BLOCK_SIZE=page, BLOCK_N=64, NUM_SPLITS=1,
        DOT_PREC=None, Q_IN_LOOP=False, PAGE_TILE=page >= 64, TMA=tma, **dict.fromkeys(ones, 1),
    )  # fmt: skip
    aligned = [n for n, t in signature.items() if t.startswith("*") or (t == "i32" and n != "stride_btb")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs),
            target=HOPPER,
            options=dict(num_warps=8, num_stages=2 if tma else 3),
        )
    except FileNotFoundError:  # no ptxas
        sys.exit(3)
    assert kernel.asm["cubin"]
    ttgir = kernel.asm["ttgir"]
    assert "async_tma_copy" in ttgir if tma else "async_copy_global_to_local" in ttgir, "loads not pipelined"
    print(f"OK mla_decode tma={tma} page={page}", flush=True)


def splitk(block_m: int, split: int, swap_ab: bool) -> None:
    """The decode-size split-K block-FP8 GEMM (fp8 dots with per-block scales) and its reduce."""
    from moefleet.engine.kernels import fp8_splitk

    ints = "M N K stride_am stride_asm stride_bn stride_bsn stride_cs stride_cm blocks_per_split".split()
    out = "fp32" if split > 1 else "bf16"
    signature = {
        "a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": f"*{out}",
        **dict.fromkeys(ints, "i32"),
    }  # fmt: skip
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=128, GROUP_K=128, UPCAST=False, SWAP_AB=swap_ab)
    kernel = compile_for_hopper(fp8_splitk._splitk_kernel, signature, constexprs, num_warps=4, num_stages=4)
    assert kernel.asm["cubin"] and "wgmma" in kernel.asm["ptx"], "the fp8 dot did not become a wgmma"
    reduce = compile_for_hopper(
        fp8_splitk._reduce_kernel,
        {"p_ptr": "*fp32", "out_ptr": "*bf16", "numel": "i32"},
        dict(SPLIT=split, BLOCK=1024),
        num_warps=4,
    )
    assert reduce.asm["cubin"]
    print(f"OK splitk block_m={block_m} split={split} swap_ab={swap_ab}", flush=True)


if __name__ == "__main__":
    if not isinstance(fused_moe._moe_gemm_kernel, triton.JITFunction):
        sys.exit("the kernels are interpreted here: run without TRITON_INTERPRET")
    for weights in ("bf16", "fp8e4nv"):
        for swiglu in (True, False):
            gemm(weights, swiglu)
    for quant in (False, True):
        masked_rows(quant)
    for tma, page in ((True, 64), (False, 64), (False, 16)):
        mla_decode_tiles(tma, page)
    for block_m, split, swap_ab in ((16, 1, True), (64, 4, False)):
        splitk(block_m, split, swap_ab)
