#!/usr/bin/env bash
# The first GPU baseline (issue: DP attention + EP MoE): CUDA parity tests, then `moefleet bench` tables for
# both presets on 1 GPU and on an EP group of all visible GPUs. Run from the repo root on a GPU machine:
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_baseline.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/bench}
mkdir -p "$out"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv"
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu -rA 2>&1 | tail -30 | tee "$out/gpu_tests.txt"
run() { echo "== moefleet bench $*"; timeout 300 moefleet bench "$@" 2>&1 | grep -v '^$' | tail -12; }
for n in 1 "$gpus"; do
  run --preset qwen3-30b-a3b --layers 4 --nproc-per-node "$n" --mode decode --mode prefill \
    --batch-size 64 --batch-size 256 --kv-len 2048 --prefill-tokens 8192 --prefill-seq-len 2048 \
    --json "$out/bench_qwen3_ep$n.json" | tee -a "$out/bench.txt"
  run --preset deepseek-v3 --layers 2 --nproc-per-node "$n" --mode decode --mode prefill \
    --batch-size 32 --batch-size 64 --kv-len 1024 --prefill-tokens 4096 --prefill-seq-len 1024 \
    --json "$out/bench_deepseek_ep$n.json" | tee -a "$out/bench.txt"
  [ "$gpus" = 1 ] && break
done
