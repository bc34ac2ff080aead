#!/usr/bin/env bash
# One 1-GPU call: the EP72-shaped decode projection (FP8, depths 4 and 12, 61 layers, graphs) with
# --gemm-backend cublas vs auto (the split-K decode GEMM where fp8_splitk_configs.json says) side by side,
# interleaved, at BATCHES tokens/GPU. Logs and JSON in OUT; one summary line per run on stdout.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_decode_gemm_backends.sh OUT
set -uo pipefail
out=${1:-/tmp/gpu-gemm}; mkdir -p "$out"
BATCHES=${BATCHES:-"64 256"}; REPS=${REPS:-1}; STEPS=${STEPS:-20}
EMU="--preset deepseek-v3 --mode decode --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3 --quantization fp8"
for rep in $(seq "$REPS"); do for b in $BATCHES; do for g in cublas auto; do
  name=decode_ep72_b${b}_${g}_$rep
  timeout 150 moefleet bench $EMU --batch-size "$b" --gemm-backend $g --project-depths 4,12 --project-layers 61 \
    --steps "$STEPS" --warmup 3 --no-breakdown --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name rc=$?: $(grep -E '^\| deepseek-v3 \| decode \| [0-9]+ \|' "$out/$name.txt" | tail -1 | cut -d'|' -f8-14)"
done; done; done
