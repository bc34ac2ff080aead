#!/usr/bin/env bash
# One 1-GPU call: cuBLAS blockwise FP8 (kernels.fp8_cublas) in the EP32 prefill projection, side by side with
# bf16 and the Triton-only FP8 GEMMs (same run, same lease), plus the quantiser probe and the cuBLAS GPU tests.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_fp8_prefill_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-fp8}
mkdir -p "$out"
EMU_PRE="--preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_cublas_gpu.py 2>&1 | tail -5 | tee "$out/tests.txt"
timeout 60 python3 benchmarks/fp8_quant_probe.py > "$out/quant_probe.txt" 2>&1
# (2026-12-01 run: the Triton-only FP8 case was then spelled --quantization fp8-triton)
for q in "none" "fp8 --gemm-backend triton" "fp8"; do
  name=$(echo $q | tr ' ' '_')
  timeout 150 moefleet bench $EMU_PRE --quantization $q --project-depths 4,6 --project-layers 61 --steps 3 --warmup 1 \
    --no-breakdown --json "$out/emulate_prefill_ep32_$name.json" > "$out/emulate_prefill_ep32_$name.txt" 2>&1
  grep -iE "project|tok/s" "$out/emulate_prefill_ep32_$name.txt" | tail -4
done
