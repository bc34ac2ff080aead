#!/usr/bin/env bash
# One 1-GPU call: the GPU tests of last session's FP8/grouped-GEMM changes and the MLA decode kernel, then the
# MLA decode tile sweep at 16- and 64-token pages (page-tiled loads, TMA descriptors, unmasked full tiles).
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_mla_tiles_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-mla}
mkdir -p "$out"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_attention_kernels_gpu.py -k mla \
  tests/gpu/test_fp8_cublas_gpu.py tests/gpu/test_fp8_cublas_model_gpu.py tests/gpu/test_grouped_mm_gpu.py \
  > "$out/tests.txt" 2>&1; tail -3 "$out/tests.txt"
timeout 240 python3 benchmarks/attention_kernels.py --mla-only --sweep --mla-pages 16,64 > "$out/mla_sweep.txt" 2>&1
cat "$out/mla_sweep.txt"
