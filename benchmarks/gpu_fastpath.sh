#!/usr/bin/env bash
# GPU fast path (issue 8) on 1 GPU: the GPU tests, then `moefleet bench` at the issue's target shapes with the
# old path (torch attention, no graphs) and the new one (triton attention, CUDA graphs auto) side by side.
# Run from the repo root on a GPU machine:
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_fastpath.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/bench-fastpath}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv"
timeout 540 python3 -m pytest -q -p no:cacheprovider tests/gpu -rA 2>&1 | tail -40 | tee "$out/gpu_tests.txt"
run() { echo "== moefleet bench $*"; timeout 540 moefleet bench "$@" 2>&1 | grep -v '^$' | tail -14; }
for path in "torch off" "triton auto"; do
  set -- $path
  tag="$1-graphs-$2"
  run --preset deepseek-v3 --layers 2 --mode decode --batch-size 256 --kv-len 2000 \
    --attention-backend "$1" --cuda-graphs "$2" --json "$out/deepseek_decode_$tag.json" | tee -a "$out/bench.txt"
  run --preset qwen3-30b-a3b --layers 4 --mode decode --batch-size 256 --kv-len 2000 \
    --attention-backend "$1" --cuda-graphs "$2" --json "$out/qwen3_decode_$tag.json" | tee -a "$out/bench.txt"
  run --preset deepseek-v3 --layers 2 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 \
    --attention-backend "$1" --cuda-graphs "$2" --json "$out/deepseek_prefill_$tag.json" | tee -a "$out/bench.txt"
  run --preset qwen3-30b-a3b --layers 4 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 \
    --attention-backend "$1" --cuda-graphs "$2" --json "$out/qwen3_prefill_$tag.json" | tee -a "$out/bench.txt"
done
