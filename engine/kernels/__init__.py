"""Triton kernels of the GPU fast path: paged/varlen attention (`paged_attention`, `mla_decode`), fused MoE
(`fused_moe`, `moe_align`) and FP8 block GEMMs. Each has a slow torch reference written from the formula (the
test oracle); CPU tests run the kernels under TRITON_INTERPRET=1."""
