"""Triton kernels for the GPU fast path (issue 8): paged/varlen attention (`paged_attention`, `mla_decode`) with
slow torch references from the formula (`attention_reference`), and the fused MoE kernels. Each kernel has a
pure-torch reference used on CPU and as the test oracle; kernels run under TRITON_INTERPRET=1 in CPU tests."""
