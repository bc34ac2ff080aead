"""Triton kernels (run on CUDA; under TRITON_INTERPRET=1 on CPU for tests) and their torch references."""
