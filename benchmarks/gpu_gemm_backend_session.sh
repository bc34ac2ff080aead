#!/usr/bin/env bash
# One 1-GPU call: torch's GEMMs (cuBLAS blockwise FP8 scaled_mm, bf16 grouped_mm for prefill experts) vs our
# Triton kernels in the deployment-shape projections, side by side in one run (--gemm-backend auto vs
# triton), decode repeated for the run-to-run spread, plus the GPU tests, the quantiser probe and an eager
# decode profile.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_gemm_backend_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-gemm}
mkdir -p "$out"
EMU_DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3"
EMU_PRE="--preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_grouped_mm_gpu.py tests/gpu/test_fp8_cublas_gpu.py \
  2>&1 | tail -3 | tee "$out/tests.txt"
timeout 60 python3 benchmarks/fp8_quant_probe.py > "$out/quant_probe.txt" 2>&1
run() {  # name, then bench arguments
  local name=$1; shift
  timeout 150 moefleet bench "$@" --project-layers 61 --steps 5 --warmup 2 --no-breakdown \
    --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name: $(grep -E '^\| deepseek-v3 \| (decode|prefill) \| [0-9]+ \|' "$out/$name.txt" | tail -1)"
}
for q in none fp8; do
  for g in triton auto; do
    run prefill_ep32_${q}_$g $EMU_PRE --project-depths 4,6 --quantization $q --gemm-backend $g
  done
done
run decode_ep72_none_auto_1 $EMU_DEC --project-depths 4,8
run decode_ep72_fp8_auto $EMU_DEC --project-depths 4,8 --quantization fp8
run decode_ep72_none_auto_2 $EMU_DEC --project-depths 4,8
timeout 120 python3 benchmarks/profile_step.py --steps 3 --skip 2 --rows 40 -- bench $EMU_DEC --layers 6 \
  --steps 3 --warmup 2 --cuda-graphs off --no-breakdown > "$out/profile_decode_ep72.txt" 2>&1
tail -45 "$out/profile_decode_ep72.txt"
