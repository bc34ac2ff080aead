#!/usr/bin/env bash
# One 1-GPU call: torch's GEMMs (bf16 grouped_mm experts, cuBLAS blockwise FP8) vs our Triton kernels in the
# deployment-shape projections, side by side in one run (--gemm-backend auto vs triton), plus the GPU tests.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_gemm_backend_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-gemm}
mkdir -p "$out"
EMU_DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3"
EMU_PRE="--preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_grouped_mm_gpu.py tests/gpu/test_fp8_cublas_gpu.py \
  tests/gpu/test_moe_local_path_gpu.py tests/gpu/test_cuda_graphs.py tests/gpu/test_moe_kernels_gpu.py 2>&1 | tail -8 | tee "$out/tests.txt"
run() {  # name, then bench arguments
  local name=$1; shift
  timeout 150 moefleet bench "$@" --project-layers 61 --steps 5 --warmup 2 --no-breakdown \
    --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name: $(grep -E '^\| deepseek-v3 \| (decode|prefill) \| [0-9]+ \|' "$out/$name.txt" | tail -1)"
}
run decode_ep72_bf16_triton $EMU_DEC --project-depths 4,8 --gemm-backend triton
run decode_ep72_bf16_auto $EMU_DEC --project-depths 4,8 --gemm-backend auto
run decode_ep72_fp8_auto $EMU_DEC --project-depths 4,8 --quantization fp8 --gemm-backend auto
run prefill_ep32_bf16_auto $EMU_PRE --project-depths 4,6 --gemm-backend auto
