#!/usr/bin/env bash
# One 1-GPU call: the EP72 decode projection, bf16 vs FP8 (cuBLAS blockwise linears + Triton FP8 experts)
# interleaved twice in one run (run-to-run spread visible; depths 4 and 12, 20 steps: the 4-to-8 slope of
# 10 steps moved by up to 0.3 ms/layer between repeats), plus the wide FP8 model test.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_decode_fp8_repeat.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-dec}
mkdir -p "$out"
EMU_DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3"
timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_fp8_cublas_model_gpu.py > "$out/test_model.txt" 2>&1; grep -E "rel L2|passed|failed" "$out/test_model.txt"
for rep in 1 2; do
  for q in none fp8; do
    name=decode_ep72_${q}_$rep
    timeout 150 moefleet bench $EMU_DEC --quantization $q --project-depths 4,12 --project-layers 61 --steps 20 \
      --warmup 3 --no-breakdown --json "$out/$name.json" > "$out/$name.txt" 2>&1
    echo "$name: $(grep -E '^\| deepseek-v3 \| decode \| [0-9]+ \|' "$out/$name.txt" | tail -1)"
  done
done
